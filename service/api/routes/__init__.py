"""One router per resource; `ROUTERS` is what the app includes."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import decode, encode, health, interpolate, kl, reconstruct, sample

__all__ = ["ROUTERS"]

ROUTERS: tuple[APIRouter, ...] = (
    encode.router,
    decode.router,
    sample.router,
    kl.router,
    reconstruct.router,
    interpolate.router,
    health.router,
)
