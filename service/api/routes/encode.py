"""POST /encode: images -> q(z|x)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from service import gaussian
from service.api.bodies import request_body
from service.api.deps import read_images, served
from service.api.options import EncodeOptions, parameters
from service.api.responses import NumpyJSONResponse, error_responses
from service.schemas import EncodeResponse, ImagesRequest

__all__ = ["router"]

router = APIRouter(tags=["encode"])


@router.post(
    "/encode",
    summary="Encode images",
    response_model=EncodeResponse,
    responses=error_responses(400, 415, 422),
    openapi_extra=request_body(ImagesRequest, images=True) | parameters(EncodeOptions),
)
async def encode(request: Request) -> Response:
    """Encode images (multipart `files` or JSON base64 `images`) into mu, logvar, KL and (`samples`) z."""
    model, settings, options = served(request, EncodeOptions)
    images = await read_images(request, model, settings, invert=options.invert)
    mu, logvar = await model.encode_async(images)
    content: dict[str, Any] = {"mu": mu, "logvar": logvar, "kl": gaussian.kl_to_prior(mu, logvar).sum(axis=1)}
    if options.samples:
        eps = gaussian.generator(options.seed).standard_normal((len(mu), options.samples, model.latent_dim))
        z = gaussian.sample(
            mu[:, None, :], logvar[:, None, :], eps
        )  # (N, 1, D), (N, samples, D) -> (N, samples, D)
        content["z"] = z.astype(np.float32)
    return NumpyJSONResponse(content)
