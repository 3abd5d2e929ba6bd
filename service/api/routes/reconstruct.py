"""POST /reconstruct: images -> decoder mean at mu, and the reconstruction loss."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.api.bodies import request_body, validation_error
from service.api.deps import read_images, served
from service.api.options import ReconstructOptions, parameters
from service.api.responses import IMAGE_OUTPUT, error_responses, images_response, rendered_images
from service.likelihood import bernoulli_nll
from service.schemas import ImagesRequest, ReconstructResponse

__all__ = ["router"]

router = APIRouter(tags=["reconstruct"])


@router.post(
    "/reconstruct",
    summary="Reconstruct images",
    response_model=ReconstructResponse,
    responses={**IMAGE_OUTPUT, **error_responses(400, 415, 422)},
    openapi_extra=request_body(ImagesRequest, images=True) | parameters(ReconstructOptions),
)
async def reconstruct(request: Request) -> Response:
    """Reconstruct images through z = mu, with -log p(x | mu) per image in nats (not with grid or npy)."""
    model, settings, options = served(request, ReconstructOptions)
    image_format, scale = options.format, options.scale
    if options.inputs and image_format in ("grid", "npy"):
        raise validation_error(
            ("query", "inputs"), "inputs=true comes back beside the images in JSON: use format=png or array"
        )
    images = await read_images(request, model, settings, invert=options.invert)
    mu, _ = await model.encode_async(images)
    x_mean, logits = await model.decode_logits_async(mu)
    fields: dict[str, Any] = {"reconstruction": bernoulli_nll(images, logits)}
    if options.inputs and image_format in ("png", "array"):
        fields["inputs"] = rendered_images(images, image_format, scale)
    return images_response(x_mean, image_format, scale, **fields)
