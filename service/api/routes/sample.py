"""GET /sample: z ~ N(0, temperature^2 I), decoded."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Response

from service.api.deps import Format, ModelDep, SampleCount, Scale, Seed, Temperature
from service.api.responses import IMAGE_OUTPUT, images_response
from service.schemas import SampleResponse

__all__ = ["router"]

router = APIRouter(tags=["sample"])


@router.get("/sample", summary="Sample from the prior", response_model=SampleResponse, responses=IMAGE_OUTPUT)
async def sample(
    model: ModelDep,
    n: SampleCount,
    scale: Scale,
    seed: Seed = None,
    temperature: Temperature = 1.0,
    image_format: Format = "png",
) -> Response:
    """Draw `n` latents from the prior and decode them; the latents come back too (not with grid)."""
    latents = temperature * np.random.default_rng(seed).standard_normal((n, model.latent_dim))
    latents = latents.astype(np.float32)
    return images_response(model.decode(latents), image_format, scale, latents=latents)
