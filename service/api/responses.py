"""Response classes: JSON straight from numpy through orjson, PNG bytes; the shared image-output shapes."""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import Response

from service import imaging
from service.schemas import ErrorResponse

__all__ = [
    "IMAGE_OUTPUT",
    "ImageFormat",
    "NumpyJSONResponse",
    "PNGResponse",
    "error_responses",
    "images_response",
]

ImageFormat = Literal["png", "array", "grid"]


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


# The 200 response of routes that answer format=grid with a PNG instead of JSON.
IMAGE_OUTPUT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for a route's non-validation errors (422 is documented by FastAPI itself)."""
    reasons = {
        400: "An image is empty or unreadable; the detail names which one.",
        415: "The request's content type is not one this endpoint reads.",
        503: "The model is not loaded yet.",
    }
    return {status: {"model": ErrorResponse, "description": reasons[status]} for status in statuses}


def images_response(
    images: npt.NDArray[np.floating], image_format: ImageFormat, scale: int, **fields: Any
) -> Response:
    """(N, C, H, W) images in [0, 1] as one grid PNG, or JSON `{**fields, "images": ...}`.

    format=png gives a base64 PNG per image, format=array the pixel values; `scale` enlarges PNGs.
    """
    if image_format == "grid":
        return PNGResponse(imaging.grid_png(images, scale))
    if image_format == "array":
        rendered: Any = np.ascontiguousarray(images)
    else:
        rendered = [base64.b64encode(imaging.to_png(image, scale)).decode("ascii") for image in images]
    return NumpyJSONResponse({**fields, "images": rendered})
