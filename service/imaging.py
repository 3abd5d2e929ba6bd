"""Images in and out: uploaded bytes -> a model tensor in [0, 1]; tensors -> PNG bytes and grids.

Any format and mode Pillow reads comes in: greyscale, palette, RGB, CMYK, 16-bit, with or without alpha.
Transparent pixels become the image's background colour, so a transparent PNG means what it shows.
The common upload, a small 8-bit PNG already in the model's channels, is decoded by libspng (pyspng) with
the same result at a fraction of Pillow's cost; everything else goes through Pillow.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import pyspng
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service.model_card import InputSpec

__all__ = [
    "Floats",
    "ImageError",
    "ImageTooLarge",
    "OverBudget",
    "MAX_JPEG_MARKERS",
    "MAX_JPEG_SCANS",
    "SIZED_FORMATS",
    "SMALL_PIXELS",
    "grid_png",
    "read_pixels",
    "tile",
    "to_model",
    "to_png",
    "to_pngs",
]

Floats = npt.NDArray[np.float32]

# Modes whose values are not 8-bit, and the value that maps to 1.0. "I" is how Pillow opens 16-bit PNGs.
_HIGH_DEPTH = {
    "I;16": 65535.0,
    "I;16L": 65535.0,
    "I;16B": 65535.0,
    "I;16N": 65535.0,
    "I": 65535.0,
    "F": 255.0,
}
# Between the tiles of a grid: one model pixel of mid grey, visible on dark and light backgrounds.
_GUTTER = 1
_GUTTER_VALUE = 0.5
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type by channels: greyscale, truecolour.
_PNG_COLOUR = {1: 0, 3: 2}
# Scanline bytes up to this size are stored uncompressed: deflating them would take longer than sending the
# bytes it saves (an 8x8 image is 72 bytes). Larger images (grids, scale > 1) are deflated at level 1.
_PNG_STORE_LIMIT = 4096
# 8-bit PNG colour types libspng decodes straight into the model's channels, by (channels, colour type):
# greyscale (0) for one channel, truecolour (2) and truecolour with alpha (6) for three (libspng has no
# output for greyscale with alpha; Pillow reads those).
_SPNG_FORMATS = {(1, 0): "L", (3, 2): "RGB", (3, 6): "RGBA"}
# Images of at most this many pixels (width x height) are small: libspng reads them when they are plain,
# 8 times faster than Pillow at 28 x 28. Larger ones are read by Pillow, which releases the GIL while it
# decompresses (libspng holds it throughout: 60 ms for a 4096 x 4096 PNG), so that other threads, the event
# loop's among them, go on while a large image is read; past a few hundred pixels a side the two are alike.
SMALL_PIXELS = 1 << 16
# Pillow formats whose header gives the size that is then decoded, so that `max_pixels` bounds the work
# before it starts. Not so ICNS or ICO: they name one size and may hold an embedded PNG of any other.
SIZED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "TIFF", "WEBP", "PPM")
# Chunk types after which Pillow reads a PNG differently from libspng's plain decode: transparency, EXIF
# orientation (its own chunk, or ImageMagick's raw profile or XMP in a text chunk), and animation (APNG).
_PILLOW_CHUNKS = frozenset({b"tRNS", b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"acTL"})
# Formats whose frames are images of their own (animations, pages): one with more than one frame is refused
# rather than read as its first. MPO (a JPEG and its previews) and PSD (the layers of one picture) are not.
_SEQUENCE_FORMATS = frozenset({"GIF", "PNG", "WEBP", "TIFF", "AVIF", "DCX", "FLI"})
# Formats Pillow opens that are not decoded for an upload: EPS is rendered by running Ghostscript on the
# file; BLP and IPTC wrap a JPEG, and ICNS a PNG or JPEG 2000, that Pillow decodes at whatever size (and
# number of scans) it has, past the size their header gives (and so past `max_pixels` and MAX_JPEG_SCANS).
# Pillow's stubs (BUFR, GRIB, HDF5, WMF) need a handler registered in the process and are refused too.
_REFUSED_FORMATS = frozenset({"EPS", "BLP", "IPTC", "ICNS"})
# Refused from their first bytes, before Pillow opens them (its own test for the format): opening an ICO
# decodes the largest image it holds, an embedded PNG of any size whatever its directory says.
_REFUSED_BEFORE_OPENING = {b"\x00\x00\x01\x00": "ICO"}
# Resampling along a side by a cached (new size, size) matrix while it has at most this many weights; a
# longer side goes one output pixel at a time (`_resample_axis`).
_MATRIX_WEIGHTS = 1 << 16
# Most scans of a JPEG that is decoded. A progressive JPEG is decoded scan by scan, each pass over the whole
# image: a file of a few kilobytes repeating a scan thousands of times held the decoding thread for minutes
# at 4096 x 4096 (about 7 ms a scan). Encoders write about ten.
MAX_JPEG_SCANS = 100
# Most markers walked to count them: an encoder writes a few hundred at most (about three a scan, restart
# markers aside), and each costs the walk a step in Python (16 MiB of 4-byte comments took 1.7 s).
MAX_JPEG_MARKERS = 4096
_JPEG_START = b"\xff\xd8"
# Most strips or tiles a TIFF's image is made of, for each plane (an image stored a channel at a time has
# up to 4). Pillow makes an object of each while it opens the file, before its size can be checked, and
# wraps round the image for more than it has: a 2 x 2 image naming 7 million strips (14 MB) took 24 s and
# 1.7 GB to open. Encoders cut an image into strips of a few kilobytes or tiles of at least 16 x 16 pixels
# (4096 x 4096 of those is this many).
MAX_TIFF_PARTS = 1 << 16
# Most values of any one entry in a TIFF's first directory, numbers that Pillow unpacks one object each as
# it opens the file (2 million resolution values, 16 MB, took 2.5 s and 300 MB). A 16-bit palette has
# 196608; strips and tiles are bounded above.
MAX_TIFF_VALUES = 1 << 18
# A TIFF's first bytes, as Pillow accepts them: (byte order, BigTIFF).
_TIFF_HEADERS = {
    b"II*\0": ("<", False),
    b"II\0*": ("<", False),
    b"MM\0*": (">", False),
    b"MM*\0": (">", False),
    b"II+\0": ("<", True),
    b"MM\0+": (">", True),
}
# The directory entries that list a TIFF's strips and tiles (their count is how many there are).
_TIFF_PARTS = {273: "strips", 324: "tiles"}
# Directory entries: samples a pixel, and whether they are stored a plane at a time (2) or together (1).
_TIFF_SAMPLES, _TIFF_PLANAR = 277, 284
# Entry types whose values Pillow keeps as bytes rather than unpacking: BYTE, ASCII, UNDEFINED.
_TIFF_BYTES = frozenset({1, 2, 7})
_TIFF_SHORT = 3
# Most bytes, and pixels, of an upload that Pillow decodes in Python rather than C (its registered Python
# decoders: QOI, DDS without compression, BMP's run-length encoding, plain and 16-bit PPM, XPM, MSP, 16-bit
# SGI, gzipped FITS): about 0.7 us a byte at worst (a 14 MB DDS took 11 s), and gzipped FITS 0.15 us a
# pixel (a 68 kB file of 4000 x 4000 took 2.3 s). Either limit takes under a second.
MAX_PYTHON_DECODED_BYTES = 1 << 20
MAX_PYTHON_DECODED_PIXELS = 1 << 22
# A JPEG marker: 0xFF and a code other than 0x00 (a stuffed byte of entropy-coded data), 0xD0-0xD7 (restart
# markers, within entropy-coded data) and 0xFF (fill before a marker).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SCAN, _JPEG_END, _JPEG_NO_LENGTH = 0xDA, 0xD9, (0xD8, 0x01)
# Channels of each PNG colour type: greyscale, truecolour, palette, greyscale + alpha, truecolour + alpha.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# The seven passes of Adam7 interlacing: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
# Bytes of scanlines inflated at a time while they are counted (and dropped).
_INFLATE_STEP = 1 << 20
# zlib header: deflate, 32 KiB window, no dictionary, check bits (RFC 1950).
_ZLIB_HEADER = b"\x78\x01"


class ImageError(ValueError):
    """Bytes that are not a readable image; the message completes "file N ..." (it never quotes the bytes)."""


class ImageTooLarge(ImageError):
    """An image with more pixels than the server decodes, found from its header before decompression."""


class OverBudget(ImageTooLarge):
    """An image within `max_pixels` but with more pixels than its request has left (`budget`), found from its
    header before decompression."""

    def __init__(self, pixels: int) -> None:
        super().__init__(f"has {pixels} pixels")
        self.pixels = pixels


def read_pixels(
    data: bytes,
    spec: InputSpec,
    *,
    invert: bool = False,
    max_pixels: int | None = None,
    budget: int | None = None,
    formats: tuple[str, ...] | None = None,
    limit_python: bool = False,
) -> Floats:
    """Decode one image to (H, W, C) in [0, 1] at its own size, with the model's channels.

    Images of more than `max_pixels` (width x height) are refused from their header, before any pixel is
    decompressed (ImageTooLarge), and so are those of more than `budget`, the pixels their request has left
    (OverBudget); so is anything Pillow's own decompression-bomb guard refuses. `formats` limits what Pillow
    may read (None: any format it knows), and `limit_python` (for an upload) the size of a file that it
    decodes in Python (MAX_PYTHON_DECODED_BYTES and MAX_PYTHON_DECODED_PIXELS). Transparent pixels take the
    background colour of images drawn the model's way, or the other way round with `invert` (dark strokes on
    white paper for a model trained on light-on-dark digits).
    """
    if not data:
        raise ImageError("is empty (0 bytes)")
    # The background of the image as uploaded: the model's own unless the caller says it is inverted.
    light_background = (spec.foreground == "dark") != invert
    bound = max_pixels if budget is None else budget if max_pixels is None else min(max_pixels, budget)
    plain = _plain_png(data, spec.channels, bound)
    if plain is not None:
        return _composited(plain, spec.channels, light_background)
    if data.startswith(_JPEG_START):
        _check_jpeg_markers(data)
    if data[:4] in _TIFF_HEADERS:
        _check_tiff_directory(data)
    refused = _REFUSED_BEFORE_OPENING.get(data[:4])
    if refused is not None:
        raise ImageError(f"is in the {refused} format, which this server does not decode")
    try:
        with Image.open(io.BytesIO(data), formats=formats) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(
                    f"is {width}x{height} pixels, more than the {max_pixels} this server decodes "
                    "(VAE_MAX_IMAGE_PIXELS)"
                )
            if budget is not None and width * height > budget:
                raise OverBudget(width * height)
            if opened.format in _REFUSED_FORMATS or isinstance(opened, ImageFile.StubImageFile):
                raise ImageError(f"is in the {opened.format} format, which this server does not decode")
            # Not n_frames: counting a TIFF's pages walks them all, in time that grows with their square
            # (80000 empty pages, 4.3 MB, took 25 s).
            if getattr(opened, "is_animated", False) and opened.format in _SEQUENCE_FORMATS:
                raise ImageError(
                    f"is a {opened.format} of more than one frame; send each frame as an image of its own"
                )
            if limit_python and {tile[0] for tile in opened.tile} & Image.DECODERS.keys():
                _check_python_decoded(opened.format, len(data), width * height)
            if opened.format == "PNG":
                _check_png_rows(data, width, height)
            ImageOps.exif_transpose(opened, in_place=True)  # the upload's own copy: no second one
            return _as_floats(opened, spec.channels, light_background)
    except ImageError:
        raise
    except UnidentifiedImageError as error:
        raise ImageError("is not an image format Pillow can read") from error
    # Pillow's own guard, left at its default (it is global to the process), refuses first what is far
    # larger: an error past twice Image.MAX_IMAGE_PIXELS, a warning past it (an error where warnings are).
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        if max_pixels is None:
            raise ImageTooLarge(f"is too large to decode ({error})") from error
        raise ImageTooLarge(
            f"has more pixels than the {max_pixels} this server decodes (VAE_MAX_IMAGE_PIXELS)"
        ) from error
    except Exception as error:  # Pillow's decoders raise many types on corrupt or truncated data
        # Only the type: some of Pillow's messages quote bytes of the file.
        raise ImageError(f"cannot be decoded ({type(error).__name__}: corrupt or truncated)") from error


def to_model(images: Sequence[Floats], spec: InputSpec, *, invert: bool = False) -> Floats:
    """`read_pixels` results -> the model's (N, C, H, W): resized to its size, flipped with `invert`.

    Images of the same size are resized together, in one matrix product (a request's images usually are).
    """
    batch = np.empty((len(images), spec.channels, spec.height, spec.width), dtype=np.float32)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, pixels in enumerate(images):
        by_size.setdefault(pixels.shape[:2], []).append(i)
    for indices in by_size.values():
        stacked = np.stack([images[i] for i in indices]).transpose(0, 3, 1, 2)  # (k, H, W, C) -> (k, C, H, W)
        batch[indices] = _resize(stacked, spec.height, spec.width)
    if invert:
        np.subtract(1.0, batch, out=batch)
    return batch


def _check_jpeg_markers(data: bytes) -> None:
    """ImageError for a JPEG of more than MAX_JPEG_SCANS scans, or more than MAX_JPEG_MARKERS markers.

    Marker segments are skipped by their length (so a thumbnail inside EXIF is not counted), entropy-coded
    data by a search for the next marker, and nothing past the image's end marker is read (a motion photo
    carries megabytes of video there). A file cut short ends the walk: Pillow then says what is wrong.
    """
    scans, position = 0, len(_JPEG_START)
    for _ in range(MAX_JPEG_MARKERS):
        marker = _JPEG_MARKER.search(data, position)
        if marker is None or (code := data[marker.start() + 1]) == _JPEG_END:
            return
        position = marker.end()
        if code in _JPEG_NO_LENGTH:
            continue
        position += int.from_bytes(data[position : position + 2], "big")  # the length counts its 2 bytes
        if code == _JPEG_SCAN:
            scans += 1
        if scans > MAX_JPEG_SCANS:
            raise ImageError(f"is a JPEG of more than {MAX_JPEG_SCANS} scans, the most this server decodes")
    raise ImageError(f"is a JPEG of more than {MAX_JPEG_MARKERS} markers, the most this server reads")


def _check_python_decoded(image_format: str | None, size: int, pixels: int) -> None:
    """ImageError for a file that Pillow would decode in Python, of more than MAX_PYTHON_DECODED_BYTES or
    MAX_PYTHON_DECODED_PIXELS."""
    for amount, most, unit in (
        (size, MAX_PYTHON_DECODED_BYTES, "bytes"),
        (pixels, MAX_PYTHON_DECODED_PIXELS, "pixels"),
    ):
        if amount > most:
            raise ImageError(
                f"is a {image_format} of {amount} {unit}, which is decoded in Python here; this server "
                f"decodes at most {most} {unit} of it (send a PNG or JPEG)"
            )


def _check_tiff_directory(data: bytes) -> None:
    """ImageError for a TIFF whose first directory lists more strips or tiles than MAX_TIFF_PARTS a plane,
    or more than MAX_TIFF_VALUES numbers in one entry, read from the entries' counts (not their values). A
    file cut short ends the check: Pillow then says what is wrong."""
    order, big = _TIFF_HEADERS[data[:4]]
    # (directory offset, entry count, entry) formats: classic TIFF, or BigTIFF's 64-bit offsets and counts.
    where, count_of, entry = (
        (order + "Q", order + "Q", "HHQ8s") if big else (order + "I", order + "H", "HHI4s")
    )
    size = struct.calcsize(order + entry)
    try:
        (directory,) = struct.unpack_from(where, data, 8 if big else 4)
        (entries,) = struct.unpack_from(count_of, data, directory)
    except (struct.error, OverflowError):  # past the end, or past what an offset can be
        return
    start = directory + struct.calcsize(count_of)
    listed = data[start : start + min(entries, (len(data) - start) // size) * size]
    parts, samples, planar = {}, 1, 1
    for tag, kind, count, value in struct.iter_unpack(order + entry, listed):
        if kind not in _TIFF_BYTES and count > MAX_TIFF_VALUES:
            raise ImageError(
                f"is a TIFF whose entry {tag} lists {count} values, more than the {MAX_TIFF_VALUES} this "
                "server reads"
            )
        if tag in _TIFF_PARTS:
            parts[tag] = count
        elif tag in (_TIFF_SAMPLES, _TIFF_PLANAR) and kind == _TIFF_SHORT and count == 1:
            number = int.from_bytes(value[:2], "little" if order == "<" else "big")
            samples, planar = (number, planar) if tag == _TIFF_SAMPLES else (samples, number)
    most = MAX_TIFF_PARTS * (min(samples, 4) if planar == 2 else 1)
    for tag, count in parts.items():
        if count > most:
            raise ImageError(
                f"is a TIFF of {count} {_TIFF_PARTS[tag]}, more than the {most} this server reads"
            )


def _plain_png(data: bytes, channels: int, max_pixels: int | None) -> npt.NDArray[np.uint8] | None:
    """The 8-bit pixels of a PNG that libspng decodes exactly as Pillow would, else None.

    None for anything else (another format or colour type, 16-bit, a chunk in _PILLOW_CHUNKS, more than
    SMALL_PIXELS or than `max_pixels`, a chunk that is cut short or fails its CRC, or any decoding error):
    Pillow then reads the file, or refuses it with its own message.
    """
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    pixel_format = _SPNG_FORMATS.get((channels, colour))
    area = width * height
    too_large = area > SMALL_PIXELS or (max_pixels is not None and area > max_pixels)
    if pixel_format is None or depth != 8 or too_large or not _intact_plain_chunks(data):
        return None
    try:
        pixels: npt.NDArray[np.uint8] = pyspng.load(data, pixel_format)
    except RuntimeError:  # libspng's errors (truncated, bad filter ...): Pillow decides
        return None
    return pixels


def _check_png_rows(data: bytes, width: int, height: int) -> None:
    """ImageError for a PNG whose image data inflates to fewer bytes than its rows take.

    Pillow fills the rows that such a file lacks with zeros and reports no error (a file cut short inside
    its image data is refused; a complete zlib stream that simply holds too few rows is not): the missing
    part of the picture would be read as black. The scanlines are inflated in steps and dropped, up to the
    size they should have; IHDR's dimensions were checked against `max_pixels` before this runs.
    """
    if data[12:16] != b"IHDR":  # the PNG standard puts it first; Pillow also reads it after other chunks
        raise ImageError("is not a valid PNG (its first chunk is not IHDR)")
    depth, colour, interlace = data[24], data[25], data[28]
    bits = _PNG_CHANNELS.get(colour, 1) * depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            expected += rows * (1 + -(-columns * bits // 8))  # each row: a filter byte, then its pixels
    inflate = zlib.decompressobj()
    inflated = 0
    for kind, start, end in _png_chunks(data):
        if kind == b"IEND" or inflated >= expected:
            break
        if kind == b"IDAT":
            pending = data[start:end]
            while pending and inflated < expected:
                try:
                    # Never past `expected`: what follows (the Adler-32) is Pillow's to read or not.
                    inflated += len(inflate.decompress(pending, min(_INFLATE_STEP, expected - inflated)))
                except zlib.error as error:
                    raise ImageError("cannot be decoded (its image data is corrupt)") from error
                pending = inflate.unconsumed_tail
    if inflated < expected:
        raise ImageError(
            f"cannot be decoded (its image data holds {inflated} of the {expected} bytes its "
            f"{width}x{height} pixels take: truncated)"
        )


def _intact_plain_chunks(data: bytes) -> bool:
    """Whether the PNG's chunks up to IEND are all whole, their CRCs right, and none in _PILLOW_CHUNKS.

    pyspng has libspng ignore CRCs, and with them the zlib stream's Adler-32: without this check a corrupt
    upload would decode into wrong pixels where Pillow refuses it. What it leaves: a wrong Adler-32 under
    right CRCs (a file written so, not one damaged on the way) is read here when the PNG is small enough
    for libspng (SMALL_PIXELS), and refused by Pillow when it is larger.
    """
    view = memoryview(data)
    for kind, start, end in _png_chunks(data):
        if kind in _PILLOW_CHUNKS or end + 4 > len(data):  # end: where the chunk's CRC starts
            return False
        if zlib.crc32(view[start - 4 : end]) != struct.unpack_from(">I", data, end)[0]:  # type and data
            return False
        if kind == b"IEND":
            return True
    return False  # truncated before IEND


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, start, end of its data) of each PNG chunk whose length and type are whole, in the file's order;
    `end` lies past the file's end in a chunk cut short. The CRC follows `end`."""
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        yield kind, position + 8, position + 8 + length
        position += 12 + length


def _as_floats(image: Image.Image, channels: int, light_background: bool) -> Floats:
    """(H, W, channels) in [0, 1], alpha composited onto the background."""
    if image.mode in _HIGH_DEPTH:
        levels = np.asarray(image)
        grey = levels.astype(np.float32) / np.float32(_HIGH_DEPTH[image.mode])
        if not np.isfinite(grey).all():  # a float image (mode F) may hold anything
            raise ImageError("has pixels that are not finite numbers (NaN or infinity)")
        np.clip(grey, 0.0, 1.0, out=grey)
        transparent = image.info.get("transparency")
        if isinstance(transparent, int):  # a 16-bit greyscale PNG's tRNS: the one level that is transparent
            grey[levels == transparent] = np.float32(light_background)
        return np.repeat(grey[:, :, None], channels, axis=2)
    has_alpha = image.has_transparency_data
    target = {(1, False): "L", (1, True): "LA", (3, False): "RGB", (3, True): "RGBA"}[(channels, has_alpha)]
    try:
        if has_alpha and image.mode not in ("LA", "RGBA"):
            image = image.convert("RGBA")  # palette transparency, "PA", "La", "RGBa" ...
        converted = image if image.mode == target else image.convert(target)
    except ValueError as error:  # a mode Pillow has no conversion for (LAB, HSV ...)
        raise ImageError(f"is in colour mode {image.mode}, which cannot be converted to {target}") from error
    return _composited(np.asarray(converted), channels, light_background)


def _composited(levels: npt.NDArray[np.uint8], channels: int, light_background: bool) -> Floats:
    """8-bit (H, W) or (H, W, channels [+ alpha]) -> (H, W, channels) in [0, 1], alpha over the background."""
    array = levels.astype(np.float32)
    array /= np.float32(255.0)
    if array.ndim == 2:
        return array[:, :, None]
    if array.shape[2] == channels:
        return array
    colour, alpha = array[:, :, :channels], array[:, :, channels:]
    composited: Floats = colour * alpha + np.float32(light_background) * (1.0 - alpha)
    return composited


def _resize(pixels: Floats, height: int, width: int) -> Floats:
    """(N, C, H, W) -> (N, C, height, width), each side on its own: a box filter (area average) along a
    side that shrinks, bilinear along one that grows.

    Pillow's resampling (the weights of its BOX and BILINEAR filters), done as two small matrix products:
    (H', H) @ (N, C, H, W) @ (W, W'), with the matrices computed once per size. A side too long for a
    matrix (a 1 x 16 million image would need one of 512 MB) is resampled one output pixel at a time,
    the side that shrinks the most first: the copy between the two passes is never larger than the image
    (growing the short side of that image first made one of 8 x 16 million).
    """
    size_h, size_w = pixels.shape[2:]
    if (size_h, size_w) == (height, width):
        return pixels
    box_h, box_w = size_h >= height, size_w >= width
    if size_h * height <= _MATRIX_WEIGHTS and size_w * width <= _MATRIX_WEIGHTS:
        rows, columns = _resampling(size_h, height, box_h), _resampling(size_w, width, box_w)
        resized: Floats = (rows @ pixels @ columns.T).astype(np.float32, copy=False)
    elif height / size_h <= width / size_w:
        resized = _resample_axis(_resample_axis(pixels, 2, height, box_h), 3, width, box_w)
    else:
        resized = _resample_axis(_resample_axis(pixels, 3, width, box_w), 2, height, box_h)
    np.clip(resized, 0.0, 1.0, out=resized)
    return resized


def _taps(size: int, new_size: int, box: bool) -> Iterator[tuple[int, npt.NDArray[np.float64]]]:
    """Pillow's BOX or BILINEAR filter along one axis: per output pixel, its first input pixel and weights
    (one output pixel's at a time: those of a long side take memory).

    As Pillow's `precompute_coeffs` (libImaging/Resample.c): each output pixel's centre in input
    coordinates, the filter widened by the scale when shrinking, the taps it covers, normalised to sum 1.
    """
    scale = size / new_size
    widen = max(scale, 1.0)
    support = (0.5 if box else 1.0) * widen
    for i in range(new_size):
        centre = (i + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        stop = min(int(centre + support + 0.5), size)
        x = (np.arange(first, stop) - centre + 0.5) / widen
        weights = ((x > -0.5) & (x <= 0.5)).astype(np.float64) if box else np.maximum(1.0 - np.abs(x), 0.0)
        total = weights.sum()
        yield first, weights / total if total else weights


@lru_cache(maxsize=64)
def _resampling(size: int, new_size: int, box: bool) -> Floats:
    """(new_size, size) matrix of `_taps`, as float32; at most _MATRIX_WEIGHTS of them, so the cache stays
    small (64 of 256 KiB at most)."""
    matrix = np.zeros((new_size, size))
    for i, (first, weights) in enumerate(_taps(size, new_size, box)):
        matrix[i, first : first + len(weights)] = weights
    return matrix.astype(np.float32)


def _resample_axis(pixels: Floats, axis: int, new_size: int, box: bool) -> Floats:
    """`pixels` resampled along `axis` to `new_size`, an output pixel at a time: memory of the pixels only.

    Each output pixel is summed in double, as Pillow does: in float32 the average of a long side's 100 000
    taps drifts by 1e-5.
    """
    along = np.moveaxis(pixels, axis, -1)
    out = np.empty((*along.shape[:-1], new_size), dtype=np.float32)
    for i, (first, weights) in enumerate(_taps(along.shape[-1], new_size, box)):
        out[..., i] = along[..., first : first + len(weights)] @ weights
    return np.moveaxis(out, -1, axis)


def to_pngs(images: npt.NDArray[np.floating], scale: int = 1) -> list[bytes]:
    """(N, C, H, W) in [0, 1] -> one PNG each (greyscale or RGB), each pixel a `scale` x `scale` block.

    Written directly (signature, IHDR, one IDAT, IEND) rather than through Pillow, which costs more per
    image than everything else a request of small images does. Small images are stored uncompressed.
    """
    # In double: float32 values rounded once to the nearest level (in float32, v * 255 + 0.5 rounds twice,
    # and values just below a half level went one level up).
    levels = (np.clip(images.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if scale > 1:
        levels = levels.repeat(scale, axis=2).repeat(scale, axis=3)
    n, c, h, w = levels.shape
    # Scanlines: the filter type byte (0, none), then the row's pixels with their channels interleaved.
    scanlines = np.zeros((n, h, 1 + w * c), dtype=np.uint8)
    scanlines[:, :, 1:] = levels.transpose(0, 2, 3, 1).reshape(n, h, w * c)
    header = _PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR[c], 0, 0, 0))
    return [header + _png_chunk(b"IDAT", _zlib_stream(image.tobytes())) + _PNG_END for image in scanlines]


def to_png(image: npt.NDArray[np.floating], scale: int = 1) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes (greyscale or RGB), each pixel a `scale` x `scale` block."""
    return to_pngs(image[None], scale)[0]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """Length, type, data, CRC-32 of type and data (PNG specification, 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


_PNG_END = _png_chunk(b"IEND", b"")


def _zlib_stream(data: bytes) -> bytes:
    """`data` as a zlib stream: one stored deflate block when small (RFC 1950, 1951 3.2.4), else level 1."""
    if len(data) > _PNG_STORE_LIMIT:
        return zlib.compress(data, 1)
    block = b"\x01" + struct.pack("<HH", len(data), len(data) ^ 0xFFFF)  # final block, stored; LEN, NLEN
    return _ZLIB_HEADER + block + data + struct.pack(">I", zlib.adler32(data))


def tile(images: npt.NDArray[np.floating]) -> Floats:
    """(N, C, H, W) -> one (C, H', W') image: a near-square grid, row by row, with a grey gutter."""
    n, c, h, w = images.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    # Each image in a cell with the gutter below and to its right; the last row and column of gutter go.
    cells = np.full((rows * columns, c, h + _GUTTER, w + _GUTTER), _GUTTER_VALUE, dtype=np.float32)
    cells[:n, :, :h, :w] = images
    canvas = cells.reshape(rows, columns, c, h + _GUTTER, w + _GUTTER).transpose(2, 0, 3, 1, 4)
    grid: Floats = canvas.reshape(c, rows * (h + _GUTTER), columns * (w + _GUTTER))
    return np.ascontiguousarray(grid[:, :-_GUTTER, :-_GUTTER])


def grid_png(images: npt.NDArray[np.floating], scale: int = 1) -> bytes:
    """(N, C, H, W) -> the PNG of their grid."""
    return to_png(tile(images), scale)
