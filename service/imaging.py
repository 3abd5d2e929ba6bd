"""Images in and out: uploaded bytes -> a model tensor in [0, 1]; tensors -> PNG bytes and grids.

Any format and mode Pillow reads comes in: greyscale, palette, RGB, CMYK, 16-bit, with or without alpha.
Transparent pixels become the image's background colour, so a transparent PNG means what it shows.
"""

from __future__ import annotations

import io
import math

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from service.model_card import InputSpec

__all__ = ["Floats", "ImageError", "grid_png", "load_image", "tile", "to_png"]

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


class ImageError(ValueError):
    """Bytes that are not a readable image; the message completes "file N ..."."""


def load_image(data: bytes, spec: InputSpec, *, invert: bool = False) -> Floats:
    """Decode one image into the model's (C, H, W) in [0, 1] (the model maps [0, 1] to its pixel range).

    `invert` flips the polarity for images drawn the other way round from the training data (dark strokes
    on white paper for a model trained on light-on-dark digits).
    """
    if not data:
        raise ImageError("is empty (0 bytes)")
    # The background of the image as uploaded: the model's own unless the caller says it is inverted.
    light_background = (spec.foreground == "dark") != invert
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened)
            pixels = _as_floats(image, spec.channels, light_background)
    except UnidentifiedImageError as error:
        raise ImageError("is not an image format Pillow can read") from error
    except Exception as error:  # Pillow's decoders raise many types on corrupt or truncated data
        raise ImageError(f"cannot be decoded ({type(error).__name__}: {error})") from error
    pixels = _resize(pixels, spec.height, spec.width)
    if invert:
        pixels = 1.0 - pixels
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _as_floats(image: Image.Image, channels: int, light_background: bool) -> Floats:
    """(H, W, channels) in [0, 1], alpha composited onto the background."""
    if image.mode in _HIGH_DEPTH:
        grey = np.asarray(image, dtype=np.float32) / np.float32(_HIGH_DEPTH[image.mode])
        return np.repeat(np.clip(grey, 0.0, 1.0)[:, :, None], channels, axis=2)
    has_alpha = image.has_transparency_data
    if has_alpha and image.mode not in ("LA", "RGBA"):
        image = image.convert("RGBA")  # palette transparency, "PA", "La", "RGBa" ...
    target = {(1, False): "L", (1, True): "LA", (3, False): "RGB", (3, True): "RGBA"}[(channels, has_alpha)]
    array = np.asarray(image.convert(target), dtype=np.float32) / np.float32(255.0)
    if array.ndim == 2:
        array = array[:, :, None]
    if not has_alpha:
        return array
    colour, alpha = array[:, :, :channels], array[:, :, channels:]
    composited: Floats = colour * alpha + np.float32(light_background) * (1.0 - alpha)
    return composited


def _resize(pixels: Floats, height: int, width: int) -> Floats:
    """Resize each channel in float: box filter when shrinking (area average), bilinear otherwise."""
    if pixels.shape[:2] == (height, width):
        return pixels
    shrinking = pixels.shape[0] >= height and pixels.shape[1] >= width
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c])).resize((width, height), method))
        for c in range(pixels.shape[2])
    ]
    resized: Floats = np.clip(np.stack(planes, axis=2), 0.0, 1.0).astype(np.float32)
    return resized


def to_png(image: npt.NDArray[np.floating], scale: int = 1) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes (greyscale or RGB), each pixel a `scale` x `scale` block."""
    levels = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if scale > 1:
        levels = levels.repeat(scale, axis=1).repeat(scale, axis=2)
    plane = levels[0] if levels.shape[0] == 1 else levels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(plane)).save(buffer, format="PNG")
    return buffer.getvalue()


def tile(images: npt.NDArray[np.floating]) -> Floats:
    """(N, C, H, W) -> one (C, H', W') image: a near-square grid, row by row, with a grey gutter."""
    n, c, h, w = images.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.full(
        (c, rows * (h + _GUTTER) - _GUTTER, columns * (w + _GUTTER) - _GUTTER),
        _GUTTER_VALUE,
        dtype=np.float32,
    )
    for i in range(n):
        top, left = (i // columns) * (h + _GUTTER), (i % columns) * (w + _GUTTER)
        canvas[:, top : top + h, left : left + w] = images[i]
    return canvas


def grid_png(images: npt.NDArray[np.floating], scale: int = 1) -> bytes:
    """(N, C, H, W) -> the PNG of their grid."""
    return to_png(tile(images), scale)
