"""Bytes -> model tensors for every mode Pillow has; tensors -> PNGs and grids."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service import imaging
from service.imaging import Floats, ImageError, grid_png, read_pixels, tile, to_model, to_png, to_pngs
from service.model_card import InputSpec
from tests.service.helpers import png, truncated_png

GREY = InputSpec(channels=1, height=8, width=8, foreground="light")
COLOUR = InputSpec(channels=3, height=8, width=8, foreground="light")
DARK = InputSpec(channels=1, height=8, width=8, foreground="dark")

# An 8x8 ramp 0..252 covering the whole range, as uint8.
RAMP = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)
# One 8-bit level: the most a round trip through an 8-bit mode may move a value in [0, 1].
LEVEL = 1 / 255 + 1e-6


def load_image(data: bytes, spec: InputSpec, *, invert: bool = False) -> Floats:
    """One upload as the routes read it: decoded, then resized and flipped as a batch of one; (C, H, W)."""
    return to_model([read_pixels(data, spec, invert=invert)], spec, invert=invert)[0]


def encoded(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(RAMP),
        lambda: Image.fromarray(RAMP).convert("RGB"),
        lambda: Image.fromarray(RAMP).convert("RGBA"),
        lambda: Image.fromarray(RAMP).convert("LA"),
        lambda: Image.fromarray(RAMP).convert("P"),
        lambda: Image.fromarray(RAMP.astype(np.uint16) * 257).convert("I;16"),
        lambda: Image.fromarray(RAMP.astype(np.int32) * 257),
        lambda: Image.fromarray(RAMP).convert("CMYK"),
        lambda: Image.fromarray(RAMP.astype(np.float32)),
    ],
    ids=["L", "RGB", "RGBA-opaque", "LA-opaque", "P", "I;16", "I", "CMYK", "F"],
)
def test_every_mode_gives_the_same_greyscale_tensor(make: object) -> None:
    image = make()  # type: ignore[operator]
    # PNG holds most modes; CMYK, 32-bit integer and float need TIFF.
    data = encoded(image, "TIFF" if image.mode in ("CMYK", "I", "F") else "PNG")
    x = load_image(data, GREY)
    assert x.shape == (1, 8, 8)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[0], RAMP / 255.0, atol=LEVEL)


def test_bilevel_images_read_as_zero_and_one() -> None:
    x = load_image(png(RAMP, mode="1"), GREY)
    assert set(np.unique(x)) <= {0.0, 1.0}


def test_colour_model_gets_three_channels() -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 2] = 255, RAMP
    x = load_image(png(rgb), COLOUR)
    assert x.shape == (3, 8, 8)
    np.testing.assert_allclose(x[0], 1.0)
    np.testing.assert_allclose(x[1], 0.0)
    np.testing.assert_allclose(x[2], RAMP / 255.0, atol=LEVEL)


def test_greyscale_into_a_colour_model_is_repeated() -> None:
    x = load_image(encoded(Image.fromarray(RAMP.astype(np.uint16) * 257).convert("I;16")), COLOUR)
    np.testing.assert_allclose(x, np.repeat((RAMP / 255.0)[None], 3, axis=0), atol=LEVEL)


def rgba(alpha: int) -> bytes:
    """White strokes (the ramp) over pixels whose alpha is `alpha`."""
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[..., :3] = 255
    pixels[..., 3] = alpha
    return png(pixels)


@pytest.mark.parametrize("invert", [False, True], ids=["as-is", "inverted"])
@pytest.mark.parametrize(
    ("spec", "background"), [(GREY, 0.0), (DARK, 1.0)], ids=["light-model", "dark-model"]
)
def test_transparent_pixels_become_the_model_background(
    spec: InputSpec, background: float, invert: bool
) -> None:
    # Whatever the colour under a fully transparent pixel, and whichever polarity, it ends as background.
    x = load_image(rgba(alpha=0), spec, invert=invert)
    np.testing.assert_allclose(x, background)


def test_half_transparent_white_is_composited_onto_black() -> None:
    x = load_image(rgba(alpha=128), GREY)
    np.testing.assert_allclose(x, 128 / 255, atol=LEVEL)


def test_palette_transparency_is_honoured() -> None:
    image = Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).convert("P")
    image.info["transparency"] = image.getpixel((0, 0))
    assert image.has_transparency_data
    np.testing.assert_allclose(load_image(encoded(image), GREY), 0.0)


def test_invert_flips_dark_on_light_drawings() -> None:
    x = load_image(png(255 - RAMP), GREY, invert=True)
    np.testing.assert_allclose(x[0], RAMP / 255.0, atol=LEVEL)


def test_shrinking_averages_each_block() -> None:
    big = np.random.default_rng(0).integers(0, 256, size=(32, 32), dtype=np.uint8)
    x = load_image(png(big), GREY)
    blocks = big.reshape(8, 4, 8, 4).mean(axis=(1, 3)) / 255.0
    # A 4x4 box filter is the block mean; Pillow computes it in float32.
    np.testing.assert_allclose(x[0], blocks, atol=1e-5)


@pytest.mark.parametrize("invert", [False, True], ids=["as-is", "inverted"])
def test_a_batch_of_mixed_sizes_equals_each_image_alone(invert: bool) -> None:
    """Images of one size are resized together: each must come out as it does alone, in its place."""
    rng = np.random.default_rng(1)
    sizes = [(28, 28), (16, 16), (28, 28), (8, 8), (3, 5), (16, 16)]
    uploads = [png(rng.integers(0, 256, size=size, dtype=np.uint8)) for size in sizes]
    batch = to_model([read_pixels(data, GREY, invert=invert) for data in uploads], GREY, invert=invert)
    alone = np.stack([load_image(data, GREY, invert=invert) for data in uploads])
    assert batch.shape == (len(sizes), 1, 8, 8)
    assert batch.dtype == np.float32
    np.testing.assert_array_equal(batch, alone)


def test_enlarging_keeps_a_flat_image_flat() -> None:
    x = load_image(png(np.full((3, 5), 200, dtype=np.uint8)), GREY)
    assert x.shape == (1, 8, 8)
    np.testing.assert_allclose(x, 200 / 255, atol=1e-5)


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[0, :] = 255  # a line along the top
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the top row becomes the right column
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    x = load_image(buffer.getvalue(), GREY)
    np.testing.assert_allclose(x[0, :, -1], 1.0)
    np.testing.assert_allclose(x[0, :, 0], 0.0)


@pytest.mark.parametrize("invert", [False, True], ids=["as-is", "inverted"])
@pytest.mark.parametrize("spec", [GREY, DARK, COLOUR], ids=["grey", "dark", "colour"])
@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16", "1"])
def test_a_png_reads_as_the_same_pixels_in_tiff(mode: str, spec: InputSpec, invert: bool) -> None:
    """8-bit PNGs in the model's channels are decoded by libspng, the rest by Pillow: the same floats."""
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(9, 7, 4), dtype=np.uint8)
    pixels[0, :, 3], pixels[1, :, 3] = 0, 255  # fully transparent and opaque rows, the rest in between
    image = Image.fromarray(pixels).convert(mode)
    tiff = image.convert("RGBA") if mode == "P" else image  # the palette's colours and alpha, in TIFF
    as_png = read_pixels(encoded(image), spec, invert=invert)
    np.testing.assert_array_equal(as_png, read_pixels(encoded(tiff, "TIFF"), spec, invert=invert))
    assert as_png.shape == (9, 7, spec.channels)


@pytest.mark.parametrize("spec", [GREY, DARK, COLOUR], ids=["grey", "dark", "colour"])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_pngs_past_small_pixels_read_by_pillow_as_libspng_reads_them(
    mode: str, spec: InputSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libspng reads PNGs of at most SMALL_PIXELS, Pillow larger ones: a large one reads alike by either."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(300, 240, 4), dtype=np.uint8)
    pixels[0, :, 3], pixels[1, :, 3] = 0, 255
    data = encoded(Image.fromarray(pixels).convert(mode))
    assert 300 * 240 > imaging.SMALL_PIXELS
    calls: list[bytes] = []
    load = imaging.pyspng.load

    def spied(data: bytes, *args: Any) -> Any:
        calls.append(data)
        return load(data, *args)

    monkeypatch.setattr(imaging.pyspng, "load", spied)
    by_pillow = read_pixels(data, spec)
    monkeypatch.setattr(imaging, "SMALL_PIXELS", 300 * 240)
    by_libspng = read_pixels(data, spec)
    plain = (mode, spec.channels) in {("L", 1), ("RGB", 3), ("RGBA", 3)}
    assert len(calls) == int(plain)  # the second read only, where libspng has an output for the mode
    np.testing.assert_array_equal(by_pillow, by_libspng)


@pytest.mark.parametrize(
    ("mode", "spec", "transparent", "background"),
    [("L", DARK, 128, 1.0), ("RGB", COLOUR, (128, 128, 128), 0.0)],
    ids=["grey-dark-model", "rgb-light-model"],
)
def test_transparency_chunk_of_a_png_is_honoured(
    mode: str, spec: InputSpec, transparent: object, background: float
) -> None:
    """A tRNS chunk makes one colour of a greyscale or RGB PNG transparent: the model's background there."""
    x = load_image(encoded(Image.fromarray(RAMP).convert(mode), transparency=transparent), spec)
    expected = np.repeat((RAMP / 255.0)[None], spec.channels, axis=0)
    expected[:, 4, 0] = background  # the one pixel of level 128
    np.testing.assert_allclose(x, expected, atol=LEVEL)


@pytest.mark.parametrize("after_pixels", [False, True], ids=["before-pixels", "after-pixels"])
def test_exif_orientation_in_a_text_chunk_is_applied(after_pixels: bool) -> None:
    """ImageMagick writes EXIF as a hex "Raw profile type exif" text chunk; Pillow reads orientation there,
    before or after the pixel data."""
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[0, :] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}\n")
    data = encoded(Image.fromarray(pixels), pnginfo=info)
    if after_pixels:  # move the text chunk (length, type, data, CRC) to just before IEND
        start = data.index(b"tEXt") - 4
        end = start + 12 + int.from_bytes(data[start : start + 4], "big")
        data = data[:start] + data[end:-12] + data[start:end] + data[-12:]
        assert data.index(b"tEXt") > data.index(b"IDAT")
    x = load_image(data, GREY)
    np.testing.assert_allclose(x[0, :, -1], 1.0)
    np.testing.assert_allclose(x[0, :, 0], 0.0)


def corrupted(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("chunk", "offset", "message"),
    [
        (b"IHDR", 17, "is not an image format Pillow can read"),  # the CRC after its 4-byte type, 13 of data
        (b"IDAT", 4, "cannot be decoded"),  # the pixel data's zlib header
    ],
    ids=["header-crc", "pixel-data"],
)
def test_corrupt_pngs_are_refused(chunk: bytes, offset: int, message: str) -> None:
    data = png(np.random.default_rng(0).integers(0, 256, size=(8, 8), dtype=np.uint8))
    with pytest.raises(ImageError, match=message):
        read_pixels(corrupted(data, data.index(chunk) + offset), GREY)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_float_images_with_pixels_that_are_not_numbers_are_refused(value: float) -> None:
    pixels = np.full((8, 8), 128.0, dtype=np.float32)
    pixels[3, 5] = value
    with pytest.raises(ImageError, match="has pixels that are not finite numbers"):
        read_pixels(encoded(Image.fromarray(pixels), "TIFF"), GREY)


@pytest.mark.parametrize(
    ("spec", "background"), [(GREY, 0.0), (DARK, 1.0)], ids=["light-model", "dark-model"]
)
def test_transparency_of_a_16_bit_greyscale_png_is_honoured(spec: InputSpec, background: float) -> None:
    levels = (RAMP.astype(np.uint16) * 257).astype(np.uint16)
    x = load_image(encoded(Image.fromarray(levels), transparency=int(levels[4, 0])), spec)
    expected = RAMP[None] / 255.0
    expected[:, 4, 0] = background  # the one pixel of that level
    np.testing.assert_allclose(x, expected, atol=1e-6)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF", "WEBP"])
def test_images_of_several_frames_are_refused(fmt: str) -> None:
    """An animation or a multi-page file is several images: none of its frames is dropped silently."""
    first, *rest = [Image.fromarray(np.full((8, 8), level, dtype=np.uint8)) for level in (0, 255, 128)]
    data = encoded(first, fmt, save_all=True, append_images=rest)
    message = f"is a {fmt} of more than one frame; send each frame as an image of its own"
    with pytest.raises(ImageError, match=message):
        read_pixels(data, GREY)
    np.testing.assert_array_equal(read_pixels(encoded(first, fmt, save_all=True), GREY), 0.0)  # one frame


def test_a_mode_that_cannot_be_converted_is_named() -> None:
    with pytest.raises(ImageError, match="is in colour mode LAB, which cannot be converted to L$"):
        read_pixels(encoded(Image.new("LAB", (8, 8)), "TIFF"), GREY)


def test_a_long_thin_image_takes_memory_of_its_pixels_only() -> None:
    """A 1 x 2^20 PNG (1 KiB of upload) to 8x8: 4 MiB of floats; resampling must not build a matrix of its
    side (64 MiB), and nothing of it may stay behind in a cache."""
    side = 1 << 20
    data = png(np.full((side, 1), 128, dtype=np.uint8))
    tracemalloc.start()
    try:
        x = load_image(data, GREY)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(x, 128 / 255, atol=1e-6)
    assert peak < 6 * 4 * side  # the pixels as floats, and their copies on the way (18 MiB measured)
    assert held < 1 << 20


def read_by_pillow(data: bytes) -> Floats | None:
    """A greyscale PNG as Pillow alone reads it, (H, W, 1) in [0, 1]; None where Pillow refuses it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            levels = np.asarray(image.convert("L"))
    except Exception:  # whatever Pillow raises on a broken file
        return None
    return (levels.astype(np.float32) / np.float32(255.0))[:, :, None]


@pytest.mark.parametrize("ramp", [False, True], ids=["noise", "ramp"])
def test_a_png_corrupt_at_any_byte_reads_as_pillow_reads_it(ramp: bool) -> None:
    """libspng, as pyspng runs it, checks neither chunk CRCs nor the pixel data's Adler-32: a corrupt upload
    must still be refused wherever Pillow refuses it, and read as Pillow reads it elsewhere."""
    pixels = RAMP if ramp else np.random.default_rng(1).integers(0, 256, size=(8, 8), dtype=np.uint8)
    data = png(pixels)
    assert read_pixels(data, GREY).shape == (8, 8, 1)
    refused = 0
    for at in range(len(data)):
        bad = corrupted(data, at)
        expected = read_by_pillow(bad)
        if expected is None:
            refused += 1
            with pytest.raises(ImageError):
                read_pixels(bad, GREY)
        else:
            np.testing.assert_array_equal(read_pixels(bad, GREY), expected, err_msg=f"byte {at} flipped")
    assert refused > len(data) // 2  # most flips break the file; the rest, in CRCs and IEND, Pillow reads


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"is empty \(0 bytes\)"),
        (b"not an image at all", "is not an image format Pillow can read"),
        (truncated_png(), "cannot be decoded"),
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_unreadable_bytes_raise_image_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(data, GREY)


def raw_png(width: int, height: int, scanlines: bytes, interlace: int = 0) -> bytes:
    """An 8-bit greyscale PNG of `scanlines` (filter byte and pixels per row, as IDAT inflates to), all its
    chunks intact."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace)
    idat = chunk(b"IDAT", zlib.compress(scanlines))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def scanlines(pixels: np.ndarray) -> bytes:
    return b"".join(b"\0" + row.tobytes() for row in pixels)


def adam7(pixels: np.ndarray) -> bytes:
    """The scanlines of `pixels` interlaced: the seven passes of Adam7, one after the other."""
    passes = [
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ]
    return b"".join(
        scanlines(pixels[y0::dy, x0::dx]) for x0, y0, dx, dy in passes if pixels[y0::dy, x0::dx].size
    )


@pytest.mark.parametrize("side", [8, 300], ids=["libspng-size", "pillow-size"])
@pytest.mark.parametrize("interlace", [0, 1], ids=["plain", "interlaced"])
def test_a_png_whose_image_data_holds_too_few_rows_is_refused(side: int, interlace: int) -> None:
    """Every chunk whole and its CRC right, the zlib stream complete, but short of the last rows: Pillow would
    read the rows that are missing as black."""
    pixels = np.random.default_rng(side).integers(0, 256, (side, side), dtype=np.uint8)
    data = adam7(pixels) if interlace else scanlines(pixels)
    levels = read_pixels(raw_png(side, side, data, interlace), GREY) * 255  # whole, it reads right
    np.testing.assert_array_equal(levels.round(), pixels[..., None])
    short = raw_png(side, side, data[: len(data) // 2], interlace)
    with pytest.raises(ImageError, match=rf"holds {len(data) // 2} of the {len(data)} bytes .* truncated"):
        read_pixels(short, GREY)
    with pytest.raises(ImageError, match="truncated"):
        read_pixels(raw_png(side, side, data[:-1], interlace), GREY)  # one byte short
    # A chunk before IHDR, which Pillow reads past: the check is not skipped (its fields are not misread).
    signature, rest = short[:8], short[8:]
    ancillary = struct.pack(">I", 1) + b"abCd" + b"x" + struct.pack(">I", zlib.crc32(b"abCdx"))
    with pytest.raises(ImageError, match="its first chunk is not IHDR"):
        read_pixels(signature + ancillary + rest, GREY)


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def test_png_round_trip_is_exact_to_one_level() -> None:
    x = (RAMP / 255.0)[None]
    np.testing.assert_array_equal(decoded(to_png(x)), RAMP)


def test_each_float32_value_goes_to_its_nearest_level() -> None:
    """Values on either side of each half level (k + 0.5) / 255, the ones a rounding in float32 moved."""
    halves = ((np.arange(255) + 0.5) / 255).astype(np.float32)
    values = np.concatenate([np.nextafter(halves, 0), halves, np.nextafter(halves, 1)]).astype(np.float32)
    nearest = np.floor(values.astype(np.float64) * 255 + 0.5)  # exact: a float32 times 255 fits in a double
    out = decoded(to_png(values.reshape(1, 1, -1)))
    np.testing.assert_array_equal(out[0], nearest)


def test_scale_repeats_each_pixel() -> None:
    x = (RAMP / 255.0)[None]
    big = decoded(to_png(x, scale=3))
    assert big.shape == (24, 24)
    np.testing.assert_array_equal(big[::3, ::3], RAMP)
    np.testing.assert_array_equal(big[2::3, 2::3], RAMP)


def test_colour_png() -> None:
    x = np.zeros((3, 8, 8))
    x[1] = 1.0
    out = decoded(to_png(x))
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 1], 255)


def test_out_of_range_values_are_clipped() -> None:
    np.testing.assert_array_equal(decoded(to_png(np.array([[[-0.5, 1.5]]]))), [[0, 255]])


def test_grid_is_near_square_with_a_gutter() -> None:
    images = np.stack([np.full((1, 8, 8), i / 4) for i in range(5)])
    canvas = tile(images)
    assert canvas.shape == (1, 2 * 8 + 1, 3 * 8 + 2)  # 5 images: 3 columns, 2 rows
    np.testing.assert_array_equal(canvas[0, :8, 9:17], 0.25)  # second image, first row
    np.testing.assert_array_equal(canvas[0, 9:, :8], 0.75)  # fourth image, second row
    np.testing.assert_array_equal(canvas[0, :, 8], 0.5)  # gutter
    assert decoded(grid_png(images, scale=2)).shape == (34, 52)


def verified(data: bytes) -> None:
    """Pillow's PNG checks: chunk CRCs, the zlib stream and its Adler-32, the image data's length."""
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        image.load()


@pytest.mark.parametrize(
    ("shape", "scale"),
    [((1, 8, 8), 1), ((3, 8, 8), 1), ((1, 28, 28), 1), ((1, 8, 8), 16), ((3, 35, 35), 4)],
    ids=["grey", "colour", "28x28", "grey-x16-deflated", "colour-x4-deflated"],
)
def test_written_pngs_are_valid_and_exact(shape: tuple[int, int, int], scale: int) -> None:
    levels = np.random.default_rng(0).integers(0, 256, size=(3, *shape))
    pngs = to_pngs(levels / 255.0, scale)
    assert len(pngs) == 3
    for png_bytes, expected in zip(pngs, levels, strict=True):
        verified(png_bytes)
        pixels = decoded(png_bytes)
        big = expected.repeat(scale, axis=1).repeat(scale, axis=2)
        np.testing.assert_array_equal(pixels, big[0] if shape[0] == 1 else big.transpose(1, 2, 0))


def test_written_pngs_round_to_the_nearest_level_and_clip() -> None:
    """A Bernoulli mean of 0.6 levels above k is written as k + 1, not cut down to k; outside [0, 1] clips."""
    k = np.arange(0, 254, dtype=np.float64)
    means = np.stack([(k + 0.6) / 255, (k + 0.4) / 255]).reshape(1, 1, 2, len(k))
    pixels = decoded(to_png(means[0]))
    np.testing.assert_array_equal(pixels, np.stack([k + 1, k]).astype(np.uint8))
    assert decoded(to_png(np.array([[[-0.5, 1.5]]]))).tolist() == [[0, 255]]


def test_small_pngs_are_stored_and_large_ones_deflated() -> None:
    flat = np.zeros((1, 1, 8, 8))
    # 8 rows of a filter byte and 8 pixels, uncompressed, plus the fixed chunks: 140 bytes.
    assert len(to_pngs(flat)[0]) == 8 + 25 + 12 + (2 + 5 + 72 + 4) + 12
    assert len(to_pngs(flat, scale=16)[0]) < 200  # 128x128 of zeros: deflated


@pytest.mark.parametrize(
    ("size", "new_size"),
    [
        ((28, 28), (8, 8)),
        ((37, 19), (8, 8)),
        ((300, 200), (28, 28)),
        ((8, 8), (28, 28)),
        ((5, 30), (8, 8)),
        ((20011, 9), (8, 8)),  # sides too long for a resampling matrix: resampled pixel by pixel
        ((3, 30011), (28, 28)),
    ],
    ids=["28-to-8", "odd-shrink", "large-shrink", "enlarge", "mixed", "long-shrink", "long-mixed"],
)
def test_resizing_matches_pillows_float_resampling(size: tuple[int, int], new_size: tuple[int, int]) -> None:
    """Each side on its own: area-averaged where it shrinks, bilinear where it grows (`mixed` has both)."""
    pixels = np.random.default_rng(1).random((*size, 1), dtype=np.float32)
    box, bilinear = Image.Resampling.BOX, Image.Resampling.BILINEAR
    # One side per Pillow call: its filter is the one of the side that changes.
    wide = Image.fromarray(pixels[:, :, 0]).resize(
        (new_size[1], size[0]), box if size[1] >= new_size[1] else bilinear
    )
    expected = np.asarray(wide.resize(new_size[::-1], box if size[0] >= new_size[0] else bilinear))
    data = encoded(Image.fromarray(pixels[:, :, 0] * 255.0), "TIFF")  # float images are read as 0..255
    x = load_image(data, InputSpec(channels=1, height=new_size[0], width=new_size[1], foreground="light"))
    # Pillow accumulates in double and rounds each pass to float32; one float32 step of values in [0, 1].
    np.testing.assert_allclose(x[0], np.clip(expected, 0.0, 1.0), rtol=0, atol=1e-6)


def test_a_long_thin_image_is_shrunk_along_its_long_side_first() -> None:
    """1 x 2 million to 8 x 8: growing the short side first made a copy of 8 x 2 million (64 MB)."""
    pixels = np.random.default_rng(2).random((1, 1, 1, 2_000_000), dtype=np.float32)
    tracemalloc.start()
    try:
        resized = imaging._resize(pixels, 8, 8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * pixels.nbytes  # one output pixel's taps and weights in double at a time (10 MB)
    # Area averages of 250 000 pixels each, the same in every row (one input row, repeated).
    np.testing.assert_allclose(resized[0, 0], np.tile(pixels.reshape(8, -1).mean(axis=1), (8, 1)), atol=1e-5)


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding() -> None:
    """A progressive JPEG repeating its last scan: a few bytes each, a pass over the whole image each."""
    progressive = encoded(Image.fromarray(RAMP), "JPEG", progressive=True)
    last_scan = progressive[progressive.rfind(b"\xff\xda") : -2]
    scans = progressive.count(b"\xff\xda")
    assert 1 < scans <= imaging.MAX_JPEG_SCANS  # an encoder's own progressive JPEG reads
    np.testing.assert_allclose(load_image(progressive, GREY)[0], RAMP / 255.0, atol=0.05)
    at_most = progressive[:-2] + last_scan * (imaging.MAX_JPEG_SCANS - scans) + b"\xff\xd9"
    assert load_image(at_most, GREY).shape == (1, 8, 8)  # decoded (a refinement scan again moves pixels)
    repeated = progressive[:-2] + last_scan * (imaging.MAX_JPEG_SCANS + 1 - scans) + b"\xff\xd9"
    with pytest.raises(ImageError, match="^is a JPEG of more than 100 scans, the most this server decodes$"):
        read_pixels(repeated, GREY)


def test_a_jpeg_of_too_many_markers_is_refused_before_decoding() -> None:
    """Empty comments before the end marker: each a step of the walk that counts scans."""
    baseline = encoded(Image.fromarray(RAMP), "JPEG")
    comments = b"\xff\xfe\x00\x02" * imaging.MAX_JPEG_MARKERS
    with pytest.raises(ImageError, match="^is a JPEG of more than 4096 markers, the most this server reads$"):
        read_pixels(baseline[:-2] + comments + b"\xff\xd9", GREY)
    few = baseline[:-2] + b"\xff\xfe\x00\x02" * 100 + b"\xff\xd9"
    np.testing.assert_allclose(load_image(few, GREY)[0], RAMP / 255.0, atol=0.05)


def test_scan_markers_outside_the_image_are_not_counted() -> None:
    """Bytes after the end of the image (a motion photo's video) or inside EXIF hold no scans of it."""
    many = b"\xff\xda\x00\x02" * (imaging.MAX_JPEG_SCANS + 1)
    baseline = encoded(Image.fromarray(RAMP), "JPEG")
    np.testing.assert_allclose(load_image(baseline + many, GREY)[0], RAMP / 255.0, atol=0.05)
    exif = Image.Exif()
    exif[0x927C] = many  # MakerNote: bytes that look like scans, inside APP1
    with_exif = encoded(Image.fromarray(RAMP), "JPEG", exif=exif.tobytes())
    assert with_exif.count(b"\xff\xda") > imaging.MAX_JPEG_SCANS
    np.testing.assert_allclose(load_image(with_exif, GREY)[0], RAMP / 255.0, atol=0.05)


def test_formats_that_need_an_outside_program_or_wrap_a_jpeg_are_named_not_decoded() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
    with pytest.raises(ImageError, match="^is in the EPS format, which this server does not decode$"):
        read_pixels(eps, GREY)
    # BLP (like IPTC) may hold a JPEG that Pillow decodes past the size and scans its header gives.
    blp = encoded(Image.fromarray(RAMP).convert("P"), "BLP")
    with pytest.raises(ImageError, match="^is in the BLP format, which this server does not decode$"):
        read_pixels(blp, GREY)
    # ICO and ICNS name a size in their directory and hold a PNG of any other: opening an ICO decodes it, so
    # an ICO is refused from its first bytes, before Pillow opens it (and its pixels, over the limit here).
    inside = encoded(Image.new("L", (128, 128)), "PNG")
    ico = struct.pack("<3H", 0, 1, 1) + struct.pack("<4B2H2I", 16, 16, 0, 0, 1, 8, len(inside), 22) + inside
    with pytest.warns(UserWarning, match="Image was not the expected size"):  # Pillow: the PNG's size
        assert Image.open(io.BytesIO(ico)).size == (128, 128)
    block = b"icp4" + struct.pack(">I", 8 + len(inside)) + inside  # icp4: 16 x 16
    icns = b"icns" + struct.pack(">I", 8 + len(block)) + block
    assert Image.open(io.BytesIO(icns)).size == (16, 16)
    for data, name in ((ico, "ICO"), (icns, "ICNS")):
        with pytest.raises(ImageError, match=f"^is in the {name} format, which this server does not decode$"):
            read_pixels(data, GREY, max_pixels=1000)
    # A placeable WMF header (an 8 x 8 box at 72 units an inch), then the standard one's start: Pillow's stub.
    wmf = b"\xd7\xcd\xc6\x9a\x00\x00" + struct.pack("<4hH", 0, 0, 8, 8, 72) + bytes(6) + b"\x01\x00\t\x00"
    wmf += bytes(44)
    with pytest.raises(ImageError, match="^is in the WMF format, which this server does not decode$"):
        read_pixels(wmf, GREY)


def tiff_of_strips(
    strips: int, *, big: bool = False, extra: tuple[tuple[int, int, int, int], ...] = ()
) -> bytes:
    """A 2x2 greyscale TIFF (little-endian, classic or BigTIFF) whose first directory lists `strips` strip
    offsets, taking turns between its two rows, one row a strip (Pillow would make an object of each), and
    the `extra` entries (tag, type, count, value) after them."""
    count_of, entry, value_size = ("<Q", "<HHQQ", 8) if big else ("<H", "<HHII", 4)
    first = 16 if big else 8
    header = b"II+\x00" + struct.pack("<HHQ", 8, 0, first) if big else b"II*\x00" + struct.pack("<I", first)
    entries = 7 + len(extra)
    offsets_at = first + struct.calcsize(count_of) + entries * struct.calcsize(entry) + value_size
    inline = 4 * strips <= value_size  # values that fit in an entry are written in it
    pixels_at = offsets_at + (0 if inline else 4 * strips)
    offsets = struct.pack(f"<{strips}I", *([pixels_at, pixels_at + 2] * strips)[:strips])
    tags = [
        (256, 3, 1, 2),  # width
        (257, 3, 1, 2),  # height
        (258, 3, 1, 8),  # bits per sample
        (262, 3, 1, 1),  # black is zero
        (273, 4, strips, int.from_bytes(offsets, "little") if inline else offsets_at),  # strip offsets
        (278, 3, 1, 1),  # rows per strip
        (279, 3, 1, 2),  # bytes of each strip (one value for all: Pillow reads it so)
        *extra,
    ]
    directory = struct.pack(count_of, entries) + b"".join(struct.pack(entry, *tag) for tag in tags)
    directory += b"\x00" * value_size  # no next directory
    return header + directory + (b"" if inline else offsets) + b"\x00\xff\xff\x00"


@pytest.mark.parametrize("big", [False, True], ids=["tiff", "bigtiff"])
def test_a_tiff_of_more_strips_than_an_image_has_rows_is_refused_unopened(big: bool) -> None:
    """Pillow makes an object of each strip as it opens the file, wrapping round the image for more: a 2x2
    image that names 7 million strips (14 MB) took 24 s and 1.7 GB before its size could be checked."""
    np.testing.assert_array_equal(read_pixels(tiff_of_strips(2, big=big), GREY)[..., 0], [[0, 1], [1, 0]])
    too_many = imaging.MAX_TIFF_PARTS + 1
    with pytest.raises(ImageError, match=f"^is a TIFF of {too_many} strips, more than the 65536 this server"):
        read_pixels(tiff_of_strips(too_many, big=big), GREY)


def test_a_tiff_with_the_other_magic_numbers_pillow_accepts_is_checked_too() -> None:
    """Pillow opens 'II\\0*' (and 'MM*\\0') as it does 'II*\\0': a check that knew only the usual four let
    3.9 million strips through (13.6 s and 2 GB)."""
    with pytest.raises(ImageError, match="strips, more than the 65536 this server reads"):
        read_pixels(b"II\0*" + tiff_of_strips(imaging.MAX_TIFF_PARTS + 1)[4:], GREY)


def test_a_tiff_directory_past_any_offset_is_a_file_pillow_refuses() -> None:
    """An offset of 2^63 overflowed the check's unpacking: a 500 instead of the 400 of a corrupt file."""
    with pytest.raises(ImageError, match="cannot be decoded"):
        read_pixels(b"II+\0\x08\0\0\0" + struct.pack("<Q", 2**63) + bytes(16), GREY)


def test_a_tiff_entry_of_too_many_numbers_is_refused_unopened() -> None:
    """Pillow unpacks each number of an entry as it opens the file: 2 million resolution values (16 MB) took
    2.5 s and 300 MB for a 2 x 2 image."""
    values = imaging.MAX_TIFF_VALUES + 1
    data = tiff_of_strips(2, extra=((282, 5, values, 0),))  # XResolution, RATIONAL
    with pytest.raises(ImageError, match=f"^is a TIFF whose entry 282 lists {values} values, more than the"):
        read_pixels(data, GREY)


def test_an_image_stored_a_plane_at_a_time_may_have_strips_for_each_plane() -> None:
    """A 4096 x 4096 RGB TIFF of 16 x 16 tiles a plane at a time has 196608 of them: a legitimate file."""
    strips = imaging.MAX_TIFF_PARTS * 3
    planes = (284, 3, 1, 2)  # planar configuration: a plane at a time
    with pytest.raises(ImageError, match=f"^is a TIFF of {strips} strips, more than the 65536 this server"):
        read_pixels(tiff_of_strips(strips, extra=(planes,)), GREY)  # one sample a pixel: one plane
    three = tiff_of_strips(strips, extra=((277, 3, 1, 3), planes))  # three samples a pixel
    try:
        read_pixels(three, GREY)  # this file's strips are not three planes' pixels: Pillow may refuse it
    except ImageError as error:
        assert "more than the" not in str(error)


def test_large_files_that_pillow_decodes_in_python_are_refused_for_uploads() -> None:
    """A QOI (or an uncompressed DDS, ...) is decoded a byte at a time in Python: 14 MB took 10 s of the one
    image-decoding thread. Uploads of more than MAX_PYTHON_DECODED_BYTES are refused; training's own files
    are read whatever their size."""
    side = 600  # noise: 4 bytes a pixel in QOI, 1.4 MB
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise), "QOI")
    assert len(data) > imaging.MAX_PYTHON_DECODED_BYTES
    message = f"^is a QOI of {len(data)} bytes, which is decoded in Python here; this server decodes at most"
    with pytest.raises(ImageError, match=message):
        read_pixels(data, GREY, limit_python=True)
    assert read_pixels(data, GREY).shape == (side, side, 1)
    small = encoded(Image.fromarray(noise[:8, :8]), "QOI")
    assert read_pixels(small, GREY, limit_python=True).shape == (8, 8, 1)
    # A few kilobytes of many pixels: gzipped FITS costs by the pixel (68 kB of 4000 x 4000 took 2.3 s).
    flat = encoded(Image.new("RGB", (2048, 2049)), "QOI")
    assert len(flat) < imaging.MAX_PYTHON_DECODED_BYTES
    with pytest.raises(ImageError, match=f"^is a QOI of {2048 * 2049} pixels, which is decoded in Python"):
        read_pixels(flat, GREY, limit_python=True)
