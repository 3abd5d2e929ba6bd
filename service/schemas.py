"""Request and response bodies. Field names mean the same thing on every endpoint:

`images` (base64 PNGs, pixel arrays or uploaded images), `latents` (z vectors, one per image),
`mu` / `logvar` (the diagonal Gaussian q(z|x)), `kl` (nats, against the prior unless a target is given).
A latent's length is checked against the loaded model where the request is read (`service.api.bodies`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Strict, Tag, WithJsonSchema
from pydantic.config import JsonDict, JsonValue

from service.model_card import DatasetInfo, InputSpec, TestMetrics

__all__ = [
    "LATENT_DIM",
    "LATENT_EXAMPLES",
    "MAX_ITEMS_SETTING",
    "SIZED_EXAMPLES",
    "EXAMPLES_LATENT_DIM",
    "DecodeRequest",
    "DecodeResponse",
    "EncodeResponse",
    "ErrorResponse",
    "GaussianParams",
    "HealthResponse",
    "ImageData",
    "ImagesRequest",
    "InterpolateRequest",
    "InterpolateResponse",
    "KLRequest",
    "KLResponse",
    "LogVariance",
    "ModelFile",
    "Limits",
    "ModelInfo",
    "ReadyResponse",
    "ReconstructResponse",
    "SampleResponse",
    "ValidationErrorResponse",
    "ValidationIssue",
    "Vector",
    "without_shape_tag",
]

# Latent coordinates beyond this are certainly not from the model and would overflow the KL's squares.
_LATENT_BOUND = 1e6
# exp(logvar) must stay finite in float64 (it overflows past 709).
_LOGVAR_BOUND = 100.0

# Numbers only: strict refuses "1.5" and true; NaN and Infinity are refused too.
LatentValue = Annotated[float, Strict(), Field(allow_inf_nan=False, ge=-_LATENT_BOUND, le=_LATENT_BOUND)]
LogVarianceValue = Annotated[float, Strict(), Field(allow_inf_nan=False, ge=-_LOGVAR_BOUND, le=_LOGVAR_BOUND)]
# The JSON-schema key of an array whose length is the loaded model's latent_dim: the served schema says
# minItems and maxItems instead, once the model is loaded (`service.api.openapi`).
LATENT_DIM = "x-latent-dim"
# The JSON-schema key of an array whose most items is a setting (its name, `max_latents` or `max_images`):
# the served schema says maxItems instead, the running server's value.
MAX_ITEMS_SETTING = "x-max-items-setting"
_AT_MOST_LATENTS: JsonDict = {MAX_ITEMS_SETTING: "max_latents"}
# The OpenAPI key of a request body whose examples hold latents: its value is the request model's name in
# LATENT_EXAMPLES, and the served schema has the examples it writes for the loaded model's latent_dim.
SIZED_EXAMPLES = "x-sized-examples"
# The examples of a request model that holds latents, by the model's name: (latent_dim) -> examples.
LATENT_EXAMPLES: dict[str, Callable[[int], list[JsonValue]]] = {}
Vector = Annotated[
    list[LatentValue],
    Field(
        min_length=1,
        description="A latent vector: latent_dim numbers (GET /model).",
        json_schema_extra={LATENT_DIM: True},
    ),
]
LogVariance = Annotated[
    list[LogVarianceValue],
    Field(
        min_length=1,
        description="log sigma^2 per latent dimension: latent_dim numbers.",
        json_schema_extra={LATENT_DIM: True},
    ),
]

# /kl's mu and logvar: one vector, or a batch (a list of vectors). Which one is decided from the first item
# before validating, so that a bad number is reported once, against the shape sent, not against both.
_ONE, _BATCH = "one", "batch"


def _one_or_batch(value: Any) -> str:
    return _BATCH if isinstance(value, list) and value and isinstance(value[0], list) else _ONE


def without_shape_tag(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """A validation error's loc as the client sees the body: without the tag pydantic puts after the field
    of a shape union (`("mu", "batch", 1, 0)` -> `("mu", 1, 0)`)."""
    if len(loc) > 1 and loc[0] in ("mu", "logvar") and loc[1] in (_ONE, _BATCH):
        return (loc[0], *loc[2:])
    return loc


def _from_base64(value: object) -> object:
    """A base64 string (optionally a data: URL, line breaks allowed) -> its bytes."""
    if not isinstance(value, str):
        return value  # the bytes validator refuses it with its own message
    payload = value
    if value[:5].lower() == "data:":  # URL schemes are case-insensitive
        header, comma, payload = value.partition(",")
        if not comma:
            raise ValueError("a data: URL with no comma before its data (data:image/png;base64,<base64>)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as error:
        raise ValueError("not valid base64") from error


ImageData = Annotated[
    bytes,
    BeforeValidator(_from_base64),
    WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64",
            "description": "An image file (PNG, JPEG, ...) in base64; a data: URL is accepted too.",
        }
    ),
]
Base64PNG = Annotated[str, Field(description="A PNG file in base64.")]
PixelArray = Annotated[list[list[list[float]]], Field(description="(C, H, W) pixel values in [0, 1].")]
Images = Annotated[
    list[Base64PNG] | list[PixelArray],
    Field(description="One image per latent: base64 PNGs (format=png) or pixel arrays (format=array)."),
]

# The latent_dim of the examples in a schema built before the model is loaded (the default model's).
EXAMPLES_LATENT_DIM = 16
# The first image of scikit-learn's digits (a zero), 8x8 greyscale, as a PNG in base64.
_EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAARklEQVR42gXBYRVAMBgAwHt7/vsiaGCaLIJGIqyCBp4EI4E1III7lLYFaG99i0Ge"
    "lh55T+LqbpI4GUm+WeQP01PqAdZW8QOg+BHx1aT2vAAAAABJRU5ErkJggg=="
)


def _decode_examples(d: int) -> list[JsonValue]:
    return [{"latents": [[0.0] * d, [(-1.0) ** i for i in range(d)]]}]


def _kl_examples(d: int) -> list[JsonValue]:
    return [
        {"mu": [0.5] * d, "logvar": [-1.0] * d},
        {"mu": [[0.5] * d, [0.0] * d], "logvar": [[-1.0] * d, [0.0] * d]},
        {"mu": [0.5] * d, "logvar": [-1.0] * d, "target": {"mu": [0.2] * d, "logvar": [-0.5] * d}},
    ]


def _interpolate_examples(d: int) -> list[JsonValue]:
    return [{"latents": [[-1.0] * d, [1.0] * d]}]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImagesRequest(_Request):
    """Images as base64 strings in JSON (the alternative to multipart `files`)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"images": [_EXAMPLE_PNG]}]})

    images: list[ImageData] = Field(
        min_length=1,
        description="Image files in base64.",
        json_schema_extra={MAX_ITEMS_SETTING: "max_images"},
    )


class DecodeRequest(_Request):
    """Latent vectors to decode into images."""

    model_config = ConfigDict(json_schema_extra={"examples": _decode_examples(EXAMPLES_LATENT_DIM)})

    latents: list[Vector] = Field(min_length=1, json_schema_extra=_AT_MOST_LATENTS)


class GaussianParams(_Request):
    """A diagonal Gaussian N(mu, diag(exp(logvar)))."""

    mu: Vector
    logvar: LogVariance


class KLRequest(_Request):
    """One posterior (vectors) or a batch (lists of vectors), and optionally the Gaussian to compare with."""

    model_config = ConfigDict(json_schema_extra={"examples": _kl_examples(EXAMPLES_LATENT_DIM)})

    mu: Annotated[
        Annotated[Vector, Tag(_ONE)]
        | Annotated[list[Vector], Field(min_length=1, json_schema_extra=_AT_MOST_LATENTS), Tag(_BATCH)],
        Discriminator(_one_or_batch),
    ]
    logvar: Annotated[
        Annotated[LogVariance, Tag(_ONE)]
        | Annotated[list[LogVariance], Field(min_length=1, json_schema_extra=_AT_MOST_LATENTS), Tag(_BATCH)],
        Discriminator(_one_or_batch),
    ]
    target: GaussianParams | None = Field(default=None, description="p in KL(q || p); N(0, I) when absent.")


class InterpolateRequest(_Request):
    """The two latents to interpolate between."""

    model_config = ConfigDict(json_schema_extra={"examples": _interpolate_examples(EXAMPLES_LATENT_DIM)})

    latents: list[Vector] = Field(min_length=2, max_length=2, description="Start and end.")


LATENT_EXAMPLES.update(
    DecodeRequest=_decode_examples, KLRequest=_kl_examples, InterpolateRequest=_interpolate_examples
)


class EncodeResponse(BaseModel):
    """q(z|x) per image, in the order sent."""

    mu: list[list[float]] = Field(description="(N, D) posterior means.")
    logvar: list[list[float]] = Field(description="(N, D) posterior log-variances.")
    kl: list[float] = Field(description="(N,) KL(q(z|x) || N(0, I)) in nats.")
    z: list[list[list[float]]] | None = Field(
        default=None, description="(N, samples, D) draws mu + sigma * eps; present when samples > 0."
    )


class DecodeResponse(BaseModel):
    """Decoded images (Bernoulli means), one per latent."""

    images: Images


class SampleResponse(BaseModel):
    """Draws from the prior and their decoded images."""

    latents: list[list[float]] = Field(description="(n, D) the z that were decoded.")
    images: Images


class KLResponse(BaseModel):
    """KL divergences in nats, one per posterior (always a list, also for a single one)."""

    kl: list[float] = Field(description="(N,) total KL per posterior.")
    kl_per_dim: list[list[float]] = Field(description="(N, D) KL per latent dimension.")


class ReconstructResponse(BaseModel):
    """Reconstructions (decoder mean at mu) and their loss."""

    images: Images
    reconstruction: list[float] = Field(
        description="(N,) -log p(x | z = mu) in nats: Bernoulli negative log-likelihood summed over pixels."
    )
    inputs: Images | None = Field(
        default=None, description="The images as the model reads them (input size, [0, 1]); with inputs=true."
    )


class InterpolateResponse(BaseModel):
    """The path between two latents and its images."""

    latents: list[list[float]] = Field(description="(steps, D) points from start to end inclusive.")
    images: Images


class HealthResponse(BaseModel):
    """The process answers."""

    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    """The model is loaded, checked and warmed up."""

    status: Literal["ready"] = "ready"
    provider: str = Field(description="The ONNX Runtime execution provider running the model.")


class ModelFile(BaseModel):
    """One ONNX graph of the model."""

    file: str
    sha256: str


class Limits(BaseModel):
    """This server's limits on one request (its VAE_MAX_* settings), by which a client can split batches."""

    max_images: int = Field(description="Images per request (VAE_MAX_IMAGES).")
    max_latents: int = Field(description="Latents per request, and n of /sample (VAE_MAX_LATENTS).")
    max_samples: int = Field(description="z draws per image: `samples` (VAE_MAX_SAMPLES).")
    max_steps: int = Field(description="Images on an interpolation path: `steps` (VAE_MAX_STEPS).")
    max_scale: int = Field(description="PNG upscaling: `scale` (VAE_MAX_SCALE).")
    max_body_bytes: int = Field(description="Bytes of a request body (VAE_MAX_BODY_BYTES).")
    max_image_pixels: int = Field(description="Pixels of one uploaded image (VAE_MAX_IMAGE_PIXELS).")
    max_request_pixels: int = Field(
        description="Pixels of a request's images together (VAE_MAX_REQUEST_PIXELS)."
    )


class ModelInfo(BaseModel):
    """The loaded model: its card's essentials and how it runs here."""

    name: str
    created_at: datetime
    architecture: str
    input: InputSpec
    input_shape: tuple[int, int, int] = Field(description="(C, H, W) of one image.")
    latent_dim: int
    likelihood: str
    logvar_range: tuple[float, float]
    provider: str = Field(description="The ONNX Runtime execution provider running the model.")
    providers: list[str] = Field(description="All providers of the sessions, in ONNX Runtime's order.")
    files: dict[str, ModelFile] = Field(description="encoder and decoder.")
    metrics: TestMetrics
    dataset: DatasetInfo
    limits: Limits


class ErrorResponse(BaseModel):
    """An error that is not a validation error: the reason, in words."""

    detail: str


class ValidationIssue(BaseModel):
    """One thing wrong with a request: where (`loc`: "query" or "body", then the field), what and its kind."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """A request whose options or body are not valid: every problem found, shaped as FastAPI reports them."""

    detail: list[ValidationIssue]
