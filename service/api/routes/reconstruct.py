"""POST /reconstruct: images -> decoder mean at mu, and the reconstruction loss."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.bodies import request_body
from service.api.deps import Format, ImageBatch, ModelDep, Scale
from service.api.responses import IMAGE_OUTPUT, error_responses, images_response
from service.likelihood import bernoulli_nll
from service.schemas import ImagesRequest, ReconstructResponse

__all__ = ["router"]

router = APIRouter(tags=["reconstruct"])


@router.post(
    "/reconstruct",
    summary="Reconstruct images",
    response_model=ReconstructResponse,
    responses={**IMAGE_OUTPUT, **error_responses(400, 415)},
    openapi_extra=request_body(ImagesRequest, images=True),
)
async def reconstruct(
    model: ModelDep, images: ImageBatch, scale: Scale, image_format: Format = "png"
) -> Response:
    """Reconstruct images through z = mu, with -log p(x | mu) per image in nats (not with grid)."""
    mu, _ = model.encode(images)
    x_mean = model.decode(mu)
    return images_response(x_mean, image_format, scale, reconstruction=bernoulli_nll(images, x_mean))
