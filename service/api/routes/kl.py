"""POST /kl: closed-form KL of diagonal Gaussians, given directly or as the posteriors of images."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Request, Response

from service import gaussian
from service.api.bodies import (
    latent_matrix,
    parse_json,
    read_body,
    refuse_invert_without_images,
    request_body,
    validation_error,
)
from service.api.deps import body_images, served
from service.api.options import KLOptions, parameters
from service.api.responses import NumpyJSONResponse, error_responses
from service.schemas import KLRequest, KLResponse

__all__ = ["router"]

router = APIRouter(tags=["kl"])


def _rows(value: list[float] | list[list[float]]) -> list[list[float]]:
    """One vector or a batch of them -> a batch."""
    return value if isinstance(value[0], list) else [value]


@router.post(
    "/kl",
    summary="KL divergence",
    response_model=KLResponse,
    responses=error_responses(400, 415, 422),
    openapi_extra=request_body(KLRequest, images=True) | parameters(KLOptions),
)
async def kl(request: Request) -> Response:
    """KL(q || N(0, I)) per posterior, or KL(q || target) with a target; multipart images: q(z|x) of each."""
    model, settings, options = served(request, KLOptions)
    body = await read_body(request, max_files=settings.max_images)
    per_dim: npt.NDArray[np.float64]
    if isinstance(body, list):
        images = await body_images(body, model, settings, invert=options.invert)
        per_dim = gaussian.kl_to_prior(*await model.encode_async(images))
    else:
        refuse_invert_without_images(options.invert)
        query = parse_json(KLRequest, body)
        d, limit = model.latent_dim, settings.max_latents
        mu = latent_matrix(_rows(query.mu), d, loc=("body", "mu"), noun="mu", limit=limit)
        logvar = latent_matrix(_rows(query.logvar), d, loc=("body", "logvar"), noun="logvar", limit=limit)
        if len(mu) != len(logvar):
            raise validation_error(
                ("body", "logvar"), f"logvar has {len(logvar)} vectors but mu has {len(mu)}"
            )
        if query.target is None:
            per_dim = gaussian.kl_to_prior(mu, logvar)
        else:
            target = query.target
            target_mu = latent_matrix([target.mu], d, loc=("body", "target", "mu"), noun="target mu", limit=1)
            target_logvar = latent_matrix(
                [target.logvar], d, loc=("body", "target", "logvar"), noun="target logvar", limit=1
            )
            per_dim = gaussian.kl_between(mu, logvar, target_mu, target_logvar)
    return NumpyJSONResponse({"kl": per_dim.sum(axis=1), "kl_per_dim": per_dim})
