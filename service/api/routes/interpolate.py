"""POST /interpolate: images along the path between two latents (or between the mu of two images)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Request, Response

from service import gaussian
from service.api.bodies import (
    FILES_FIELD,
    latent_matrix,
    parse_json,
    read_body,
    refuse_invert_without_images,
    request_body,
    validation_error,
)
from service.api.deps import body_images, served
from service.api.options import InterpolateOptions, parameters
from service.api.responses import IMAGE_OUTPUT, error_responses, images_response
from service.schemas import InterpolateRequest, InterpolateResponse

__all__ = ["router"]

router = APIRouter(tags=["interpolate"])


@router.post(
    "/interpolate",
    summary="Interpolate between latents or images",
    response_model=InterpolateResponse,
    responses={**IMAGE_OUTPUT, **error_responses(400, 415, 422)},
    openapi_extra=request_body(InterpolateRequest, images=True, image_count=2)
    | parameters(InterpolateOptions),
)
async def interpolate(request: Request) -> Response:
    """Decode `steps` latents from start to end: JSON `latents` [start, end], or two multipart images."""
    model, settings, options = served(request, InterpolateOptions)
    body = await read_body(request, max_files=settings.max_images)
    ends: npt.NDArray[np.floating]
    if isinstance(body, list):
        if len(body) != 2:
            raise validation_error(
                ("body", FILES_FIELD), f"{len(body)} images sent; interpolation takes exactly 2"
            )
        images = await body_images(body, model, settings, invert=options.invert, limit=2)
        ends, _ = await model.encode_async(images)
    else:
        refuse_invert_without_images(options.invert)
        latents = parse_json(InterpolateRequest, body).latents
        ends = latent_matrix(latents, model.latent_dim, loc=("body", "latents"), noun="latent", limit=2)
    path = gaussian.interpolate(ends[0], ends[1], options.steps, options.method).astype(np.float32)
    return images_response(await model.decode_async(path), options.format, options.scale, latents=path)
