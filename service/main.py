"""The app factory: `create_app(settings)` builds the FastAPI app; its lifespan loads and checks the model.

VAE_MODEL_DIR=models/default uvicorn --factory service.main:create_app
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

from fastapi import FastAPI, Request, Response, status

from service.api.responses import NumpyJSONResponse
from service.api.routes import ROUTERS
from service.config import Settings, get_settings
from service.runtime import Model, load_model

__all__ = ["State", "create_app"]


class State(TypedDict):
    """The lifespan state every request sees as `request.state`."""

    settings: Settings
    model: Model


async def _internal_error(request: Request, error: Exception) -> Response:
    """An unexpected failure still answers JSON with a `detail` (the traceback goes to the log)."""
    return NumpyJSONResponse(
        {"detail": "internal server error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service; `settings` default to the environment (`VAE_*`)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        yield {"settings": settings, "model": load_model(settings)}

    app = FastAPI(
        title="VAE service",
        summary="Encode images into a VAE's latent space, decode and sample from it, on ONNX Runtime.",
        version="0.1.0",
        lifespan=lifespan,
    )
    for router in ROUTERS:
        app.include_router(router)
    app.add_exception_handler(Exception, _internal_error)
    return app
