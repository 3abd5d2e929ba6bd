"""GET /sample: z ~ N(0, temperature^2 I), decoded."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request, Response

from service import gaussian
from service.api.deps import served
from service.api.options import SampleOptions, parameters
from service.api.responses import IMAGE_OUTPUT, error_responses, images_response
from service.schemas import SampleResponse

__all__ = ["router"]

router = APIRouter(tags=["sample"])


@router.get(
    "/sample",
    summary="Sample from the prior",
    response_model=SampleResponse,
    responses={**IMAGE_OUTPUT, **error_responses(422)},
    openapi_extra=parameters(SampleOptions),
)
async def sample(request: Request) -> Response:
    """Draw `n` latents from the prior and decode them; the latents come back too (not with grid or npy)."""
    model, _, options = served(request, SampleOptions)
    draws = gaussian.generator(options.seed).standard_normal((options.n, model.latent_dim))
    latents = (options.temperature * draws).astype(np.float32)
    images = await model.decode_async(latents)
    return images_response(images, options.format, options.scale, latents=latents)
