"""POST /decode: latents -> images."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.bodies import latent_matrix, read_json, request_body
from service.api.deps import served
from service.api.options import DecodeOptions, parameters
from service.api.responses import IMAGE_OUTPUT, error_responses, images_response
from service.schemas import DecodeRequest, DecodeResponse

__all__ = ["router"]

router = APIRouter(tags=["decode"])


@router.post(
    "/decode",
    summary="Decode latents",
    response_model=DecodeResponse,
    responses={**IMAGE_OUTPUT, **error_responses(415, 422)},
    openapi_extra=request_body(DecodeRequest, images=False) | parameters(DecodeOptions),
)
async def decode(request: Request) -> Response:
    """Decode latent vectors into images (the decoder's Bernoulli means)."""
    model, settings, options = served(request, DecodeOptions)
    body = await read_json(request, DecodeRequest)
    latents = latent_matrix(
        body.latents, model.latent_dim, loc=("body", "latents"), noun="latent", limit=settings.max_latents
    )
    return images_response(await model.decode_async(latents), options.format, options.scale)
