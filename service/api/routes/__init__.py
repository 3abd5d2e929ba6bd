"""One router per resource; `ROUTERS` is what the app includes."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import (
    decode,
    encode,
    health,
    interpolate,
    kl,
    metrics,
    playground,
    reconstruct,
    sample,
    v2,
)

__all__ = ["ROUTERS"]

ROUTERS: tuple[APIRouter, ...] = (
    encode.router,
    decode.router,
    sample.router,
    kl.router,
    reconstruct.router,
    interpolate.router,
    health.router,
    metrics.router,
    v2.router,
    playground.router,
)
