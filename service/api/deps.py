"""Named dependencies, as Annotated aliases: `def sample(model: ModelDep, n: SampleCount)` reads as prose.

Options travel in the query string on every endpoint; data (images, latents) in the body. Bounds that
come from settings are checked here and answered with a 422 like FastAPI's own.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request, status

from service.api.bodies import decode_images, read_body, validation_error
from service.api.responses import ImageFormat
from service.config import Settings
from service.gaussian import InterpolationMethod
from service.imaging import Floats
from service.runtime import Model

__all__ = [
    "Draws",
    "Format",
    "ImageBatch",
    "Invert",
    "Method",
    "ModelDep",
    "SampleCount",
    "Scale",
    "Seed",
    "SettingsDep",
    "Steps",
    "Temperature",
]


def _from_lifespan(request: Request, name: str) -> Any:
    """What the lifespan put in the request state; 503 until it has run."""
    value = getattr(request.state, name, None)
    if value is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="the model is not loaded yet")
    return value


def app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = _from_lifespan(request, "settings")
    return settings


def loaded_model(request: Request) -> Model:
    """The model the lifespan loaded, checked and warmed up."""
    model: Model = _from_lifespan(request, "model")
    return model


SettingsDep = Annotated[Settings, Depends(app_settings)]
ModelDep = Annotated[Model, Depends(loaded_model)]


def _at_most(name: str, value: int, limit: int, setting: str) -> int:
    if value > limit:
        raise validation_error(
            ("query", name), f"{name} is {value}; this server allows at most {limit} (VAE_{setting.upper()})"
        )
    return value


def sample_count(
    settings: SettingsDep,
    n: Annotated[
        int, Query(ge=1, description="How many latents to draw and decode (at most VAE_MAX_LATENTS).")
    ] = 16,
) -> int:
    return _at_most("n", n, settings.max_latents, "max_latents")


def draws(
    settings: SettingsDep,
    samples: Annotated[
        int, Query(ge=0, description="z draws per image, returned as `z` (at most VAE_MAX_SAMPLES).")
    ] = 0,
) -> int:
    return _at_most("samples", samples, settings.max_samples, "max_samples")


def steps(
    settings: SettingsDep,
    steps: Annotated[
        int, Query(ge=2, description="Images on the path, both ends included (at most VAE_MAX_STEPS).")
    ] = 8,
) -> int:
    return _at_most("steps", steps, settings.max_steps, "max_steps")


def scale(
    settings: SettingsDep,
    scale: Annotated[
        int, Query(ge=1, description="Nearest-neighbour upscaling of PNG outputs (at most VAE_MAX_SCALE).")
    ] = 1,
) -> int:
    return _at_most("scale", scale, settings.max_scale, "max_scale")


SampleCount = Annotated[int, Depends(sample_count)]
Draws = Annotated[int, Depends(draws)]
Steps = Annotated[int, Depends(steps)]
Scale = Annotated[int, Depends(scale)]
Seed = Annotated[
    int | None,
    Query(ge=0, description="Seeds the random draws: the same seed gives the same response, byte for byte."),
]
Temperature = Annotated[
    float, Query(ge=0.0, le=10.0, allow_inf_nan=False, description="Standard deviation of the prior draws.")
]
Invert = Annotated[
    bool,
    Query(description="Flip the images' polarity first (dark strokes on white for a light-on-dark model)."),
]
Format = Annotated[
    ImageFormat,
    Query(
        alias="format",
        description="png: a base64 PNG per image; array: pixel values in [0, 1]; grid: one PNG of them all.",
    ),
]
Method = Annotated[
    InterpolationMethod,
    Query(description="slerp follows the sphere (suits Gaussian latents); lerp a straight line."),
]


async def image_batch(
    request: Request, model: ModelDep, settings: SettingsDep, invert: Invert = False
) -> Floats:
    """The request's images (multipart `files` or JSON base64 `images`) as (N, C, H, W) in [0, 1]."""
    body = await read_body(request)
    return decode_images(body, model.card.input, invert=invert, limit=settings.max_images)


ImageBatch = Annotated[Floats, Depends(image_batch)]
