"""What routes get from the app: the dependencies `ModelDep`, `SettingsDep`, and `served` for model routes.

Options travel in the query string on every endpoint, one model of them per route (`service.api.options`),
bounds from settings included; data (images, latents) in the body. The model routes read the model, the
settings and their options with one plain call, `served(request, SampleOptions)`, rather than as FastAPI
dependencies: resolving two dependencies costs a request about 25 µs of the event loop, a fifth of what the
fastest of them take (`make bench`).

Every dependency is `async def` although none awaits: FastAPI runs a plain `def` dependency in its thread
pool, a thread round trip per dependency per request that costs more than this model's inference.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request, status

from service.api.bodies import BodyBytes, Upload, decode_images, read_body
from service.api.options import Options, parse_query
from service.config import Settings
from service.imaging import Floats
from service.metrics import Metrics
from service.runtime import Graph, Model

__all__ = ["MetricsDep", "ModelDep", "SettingsDep", "body_images", "not_stalled", "read_images", "served"]

OptionsT = TypeVar("OptionsT", bound=Options)


def _from_lifespan(request: Request, name: str) -> Any:
    """What the lifespan put in the request state; 503 until it has run.

    Read from the scope's state dict itself: `request.state` wraps it in a new object on every request.
    """
    value = request.scope.get("state", {}).get(name)
    if value is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="the model is not loaded yet")
    return value


async def app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = _from_lifespan(request, "settings")
    return settings


async def loaded_model(request: Request) -> Model:
    """The model the lifespan loaded, checked and warmed up."""
    model: Model = _from_lifespan(request, "model")
    return model


async def app_metrics(request: Request) -> Metrics:
    """The app's metrics registry."""
    metrics: Metrics = _from_lifespan(request, "metrics")
    return metrics


SettingsDep = Annotated[Settings, Depends(app_settings)]
ModelDep = Annotated[Model, Depends(loaded_model)]
MetricsDep = Annotated[Metrics, Depends(app_metrics)]


def not_stalled(request: Request, graph: Graph | None = None) -> None:
    """503 naming the problem when the loaded model's runs (of `graph`, default either) no longer return
    (`Model.stalled`); nothing before the model is loaded."""
    state = request.scope.get("state", {})
    model: Model | None = state.get("model")
    settings: Settings | None = state.get("settings")
    if model is not None and settings is not None:
        problem = model.stalled(settings.stall_timeout, graph)
        if problem is not None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=problem)


def served(request: Request, options: type[OptionsT]) -> tuple[Model, Settings, OptionsT]:
    """The loaded model, the settings, and the route's `options` validated from the query string.

    503 before the model is loaded, then 422 naming each bad option; call it before reading the body.
    """
    model: Model = _from_lifespan(request, "model")
    settings: Settings = _from_lifespan(request, "settings")
    # FastAPI has parsed the query string already (for the route's own query parameters, none here), and
    # the request keeps what it parsed.
    return model, settings, parse_query(options, request.query_params.multi_items(), settings)


async def body_images(
    body: BodyBytes | list[Upload],
    model: Model,
    settings: Settings,
    *,
    invert: bool,
    limit: int | None = None,
) -> Floats:
    """A read body's images as (N, C, H, W) in [0, 1], at most `limit` (default VAE_MAX_IMAGES) of them."""
    return await decode_images(
        body,
        model.card.input,
        invert=invert,
        limit=settings.max_images if limit is None else limit,
        max_pixels=settings.max_image_pixels,
        max_request_pixels=settings.max_request_pixels,
    )


async def read_images(request: Request, model: Model, settings: Settings, *, invert: bool) -> Floats:
    """The request's images (multipart `files` or JSON base64 `images`) as (N, C, H, W) in [0, 1]."""
    return await body_images(
        await read_body(request, max_files=settings.max_images), model, settings, invert=invert
    )
