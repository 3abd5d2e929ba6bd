"""GET /health, /ready, /model: liveness, readiness and what is loaded."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ModelDep
from service.api.responses import error_responses
from service.schemas import HealthResponse, ModelFile, ModelInfo, ReadyResponse

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness", response_model=HealthResponse)
async def health() -> HealthResponse:
    """The process is alive (it does not look at the model)."""
    return HealthResponse()


@router.get("/ready", summary="Readiness", response_model=ReadyResponse, responses=error_responses(503))
async def ready(model: ModelDep) -> ReadyResponse:
    """The model is loaded, checked against its card and warmed up; 503 before."""
    return ReadyResponse(provider=model.provider)


@router.get("/model", summary="The loaded model", response_model=ModelInfo, responses=error_responses(503))
async def model_info(model: ModelDep) -> ModelInfo:
    """The loaded model's card essentials, file hashes, test metrics and the provider running it."""
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
    )
