"""Response classes: JSON straight from numpy through orjson, PNG and .npy bytes; the image-output shapes."""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import Response

from service import imaging
from service.schemas import ErrorResponse, ValidationErrorResponse

__all__ = [
    "IMAGE_OUTPUT",
    "ImageFormat",
    "NOT_LOADED",
    "NOT_READY",
    "NPY",
    "NpyResponse",
    "NumpyJSONResponse",
    "PNGResponse",
    "STALLED",
    "error_responses",
    "images_response",
    "rendered_images",
]

ImageFormat = Literal["png", "array", "grid", "npy"]
# The 503s of the probes: liveness fails only on a stalled run, readiness before the model is loaded too.
STALLED = (
    "A model run has not returned within VAE_STALL_TIMEOUT seconds (the detail names it): "
    "the process is stuck."
)
NOT_LOADED = "The model is not loaded yet."
NOT_READY = f"{NOT_LOADED} Or: {STALLED}"
# The media type of format=npy: a NumPy .npy file (numpy.load reads it; its header gives dtype and shape).
NPY = "application/x-npy"


class NumpyJSONResponse(Response):
    """JSON rendered by orjson, numpy arrays included without a per-number Python step.

    Arrays must be C-contiguous (`np.ascontiguousarray`); non-finite floats would render as null, so the
    routes only put finite values here.
    """

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class PNGResponse(Response):
    """One PNG image."""

    media_type = "image/png"


class NpyResponse(Response):
    """An array as a NumPy .npy file (format version 1.0), written without going through a file object."""

    media_type = NPY

    def render(self, content: Any) -> bytes:
        array = np.ascontiguousarray(content)
        return _npy_header(array.dtype.str, array.shape) + array.tobytes()


@lru_cache(maxsize=256)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


# The 200 response of routes that answer format=grid with a PNG, and format=npy with a .npy file.
IMAGE_OUTPUT: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            NPY: {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "The (N, C, H, W) float32 images in [0, 1] as a .npy file: numpy.load "
                    "reads it, its header gives the dtype and shape.",
                }
            },
        }
    },
}


def error_responses(*statuses: int, unavailable: str = NOT_LOADED) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for a route's errors; 422 for the options and bodies the routes validate themselves.
    `unavailable` is why the route answers 503."""
    reasons = {
        400: "An image is empty or unreadable; the detail names which one.",
        415: "The request's content type is not one this endpoint reads.",
        503: unavailable,
    }
    entries: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": reasons[status]}
        for status in statuses
        if status != 422
    }
    if 422 in statuses:
        entries[422] = {
            "model": ValidationErrorResponse,
            "description": "An option or the body is not valid; each entry names where and why.",
        }
    return entries


def images_response(
    images: npt.NDArray[np.floating], image_format: ImageFormat, scale: int, **fields: Any
) -> Response:
    """(N, C, H, W) images in [0, 1] as one grid PNG, a .npy file, or JSON `{**fields, "images": ...}`.

    format=png gives a base64 PNG per image, format=array the pixel values; `scale` enlarges PNGs. grid and
    npy carry the images alone.
    """
    if image_format == "grid":
        return PNGResponse(imaging.grid_png(images, scale))
    if image_format == "npy":
        return NpyResponse(images)
    return NumpyJSONResponse({**fields, "images": rendered_images(images, image_format, scale)})


def rendered_images(
    images: npt.NDArray[np.floating], image_format: Literal["png", "array"], scale: int
) -> Any:
    """(N, C, H, W) images in [0, 1] as JSON content: base64 PNGs (enlarged `scale` times) or the array."""
    if image_format == "array":
        return np.ascontiguousarray(images)
    return [base64.b64encode(png).decode("ascii") for png in imaging.to_pngs(images, scale)]
