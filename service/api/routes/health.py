"""GET /health, /ready, /model: liveness, readiness, and what is loaded with this server's limits."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.deps import ModelDep, SettingsDep, not_stalled
from service.api.responses import NOT_READY, STALLED, error_responses
from service.schemas import HealthResponse, Limits, ModelFile, ModelInfo, ReadyResponse

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    summary="Liveness",
    response_model=HealthResponse,
    responses=error_responses(503, unavailable=STALLED),
)
async def health(request: Request) -> HealthResponse:
    """The process is alive: 503 only when a model run has not returned within VAE_STALL_TIMEOUT seconds (a
    hung GPU), for the orchestrator to restart it. It answers while the model loads too."""
    not_stalled(request)
    return HealthResponse()


@router.get(
    "/ready",
    summary="Readiness",
    response_model=ReadyResponse,
    responses=error_responses(503, unavailable=NOT_READY),
)
async def ready(request: Request, model: ModelDep) -> ReadyResponse:
    """The model is loaded, checked against its card and warmed up, and its runs return; 503 otherwise."""
    not_stalled(request)
    return ReadyResponse(provider=model.provider)


@router.get("/model", summary="The loaded model", response_model=ModelInfo, responses=error_responses(503))
async def model_info(model: ModelDep, settings: SettingsDep) -> ModelInfo:
    """The loaded model's card essentials, file hashes, test metrics and the provider running it, and this
    server's limits on a request."""
    card = model.card
    return ModelInfo(
        name=card.name,
        created_at=card.created_at,
        architecture=card.architecture,
        input=card.input,
        input_shape=card.input_shape,
        latent_dim=card.latent_dim,
        likelihood=card.likelihood,
        logvar_range=card.logvar_range,
        provider=model.provider,
        providers=list(model.providers),
        files={
            "encoder": ModelFile(file=card.encoder.file, sha256=card.encoder.sha256),
            "decoder": ModelFile(file=card.decoder.file, sha256=card.decoder.sha256),
        },
        metrics=card.metrics,
        dataset=card.dataset,
        limits=Limits(**settings.model_dump(include=set(Limits.model_fields))),  # named as the settings
    )
