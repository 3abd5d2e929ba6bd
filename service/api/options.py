"""Query-string options: one pydantic model per route, validated in one call, documented from the same model.

FastAPI resolves each query parameter and each dependency on its own: with a handful of them a request
spends more time there than in this model's inference. So each route takes its options as one model,
validated by pydantic-core straight from the query string (`parse_query`). Bounds that come from the server's
settings (VAE_MAX_*) are checked in the same pass, the settings being the validation context. Errors are 422s
located in the query, shaped like FastAPI's own. Unlike FastAPI, an unknown parameter (`temprature=0`) and a
repeated one (`n=abc&n=3`) are errors too: a typo would otherwise be served the defaults without a word.
`parameters(model)` documents the options in OpenAPI.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, ErrorDetails, PydanticCustomError, core_schema

from service.api.responses import ImageFormat
from service.config import DEFAULT_SAMPLES, DEFAULT_STEPS, Settings
from service.gaussian import InterpolationMethod

__all__ = [
    "MAXIMUM_SETTING",
    "DecodeOptions",
    "EncodeOptions",
    "InterpolateOptions",
    "KLOptions",
    "Options",
    "ReconstructOptions",
    "SampleOptions",
    "parameters",
    "parse_query",
]


# The JSON-schema key of a bound that is a setting (its name): the served schema says `maximum` instead, the
# running server's value (`service.api.openapi`).
MAXIMUM_SETTING = "x-maximum-setting"


@dataclass(frozen=True)
class _AtMost:
    """The value may not exceed the server's `Settings.<setting>`, which no schema written at import knows.

    Checked when the settings come as the validation context (`parse_query`); options built in code have none.
    The JSON schema names the setting (`MAXIMUM_SETTING`), so that the OpenAPI schema can say its value.
    """

    setting: str

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.with_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(schema) | {MAXIMUM_SETTING: self.setting}

    def check(self, value: int, info: ValidationInfo) -> int:
        settings: Settings | None = (info.context or {}).get("settings")
        if settings is None:
            return value
        limit: int = getattr(settings, self.setting)
        if value > limit:
            raise PydanticCustomError(
                "value_error",
                "{name} is {value}; this server allows at most {limit} ({variable})",
                {
                    "name": info.field_name,
                    # Not all of a number of thousands of digits: a detail quotes the start of what was sent.
                    "value": value if value < 10**12 else f"{str(value)[:12]}... ({len(str(value))} digits)",
                    "limit": limit,
                    "variable": f"VAE_{self.setting.upper()}",
                },
            )
        return value


def _png_only(value: int, info: ValidationInfo) -> int:
    """`scale` enlarges PNGs: with array or npy pixels, which it leaves as they are, it is refused."""
    image_format = info.data.get("format")
    if value != 1 and image_format in ("array", "npy"):
        raise PydanticCustomError(
            "value_error",
            "scale enlarges PNGs (format=png or grid); format={format} returns the pixels unscaled",
            {"format": image_format},
        )
    return value


def _with_draws(value: int | None, info: ValidationInfo) -> int | None:
    """`seed` seeds the z draws: with samples=0 there are none, and it is refused."""
    if value is not None and info.data.get("samples") == 0:
        raise PydanticCustomError(
            "value_error", "seed seeds the z draws, and samples=0 asks for none: add samples=k or drop seed"
        )
    return value


Count = Annotated[
    int,
    Field(ge=1, description="How many latents to draw and decode (at most VAE_MAX_LATENTS)."),
    _AtMost("max_latents"),
]
Draws = Annotated[
    int,
    Field(ge=0, description="z draws per image, returned as `z` (at most VAE_MAX_SAMPLES)."),
    _AtMost("max_samples"),
]
Steps = Annotated[
    int,
    Field(ge=2, description="Images on the path, both ends included (at most VAE_MAX_STEPS)."),
    _AtMost("max_steps"),
]
Scale = Annotated[
    int,
    Field(
        ge=1,
        description="Nearest-neighbour upscaling of PNG outputs, png or grid (at most VAE_MAX_SCALE).",
    ),
    _AtMost("max_scale"),
    AfterValidator(_png_only),
]
Seed = Annotated[
    int | None,
    Field(ge=0, description="Seeds the random draws: the same seed gives the same response, byte for byte."),
]
Temperature = Annotated[
    float, Field(ge=0.0, le=10.0, allow_inf_nan=False, description="Standard deviation of the prior draws.")
]
Invert = Annotated[
    bool,
    Field(description="Flip the images' polarity first (dark strokes on white for a light-on-dark model)."),
]
Format = Annotated[
    ImageFormat,
    Field(
        description="png: a base64 PNG per image; array: pixel values in [0, 1]; grid: one PNG of them all; "
        "npy: the (N, C, H, W) float32 array as a NumPy .npy file (application/x-npy, for numpy.load)."
    ),
]
Method = Annotated[
    InterpolationMethod,
    Field(description="slerp follows the sphere (suits Gaussian latents); lerp a straight line."),
]


class Options(BaseModel):
    """A route's query-string options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleOptions(Options):
    """GET /sample."""

    n: Count = DEFAULT_SAMPLES
    seed: Seed = None
    temperature: Temperature = 1.0
    format: Format = "png"
    scale: Scale = 1


class DecodeOptions(Options):
    """POST /decode."""

    format: Format = "png"
    scale: Scale = 1


class EncodeOptions(Options):
    """POST /encode."""

    invert: Invert = False
    samples: Draws = 0
    seed: Annotated[Seed, AfterValidator(_with_draws)] = None


class KLOptions(Options):
    """POST /kl."""

    invert: Invert = False


class ReconstructOptions(Options):
    """POST /reconstruct."""

    invert: Invert = False
    format: Format = "png"
    scale: Scale = 1
    inputs: bool = Field(
        default=False,
        description="Also return `inputs`: the images as the model sees them (read, converted, resized and, "
        "with invert, flipped), in the same format as `images`.",
    )


class InterpolateOptions(Options):
    """POST /interpolate."""

    steps: Steps = DEFAULT_STEPS
    method: Method = "slerp"
    format: Format = "png"
    scale: Scale = 1
    invert: Invert = False


OptionsT = TypeVar("OptionsT", bound=Options)


def parse_query(model: type[OptionsT], query: Sequence[tuple[str, str]], settings: Settings) -> OptionsT:
    """The options in `query` ((name, value) pairs in order); a 422 naming each one that is wrong, unknown
    to the route or given more than once."""
    given = dict(query)
    repeated = _repeated(query) if len(given) < len(query) else []
    try:
        options = model.model_validate(given, context={"settings": settings})
    except ValidationError as error:
        wrong = [_located(detail, model) for detail in error.errors(include_url=False, include_input=False)]
        raise RequestValidationError(wrong + repeated) from None
    if repeated:
        raise RequestValidationError(repeated)
    return options


def _repeated(query: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    counts = Counter(name for name, _ in query)
    return [
        {"type": "value_error", "loc": ("query", name), "msg": f"{name} is given {count} times; give it once"}
        for name, count in counts.items()
        if count > 1
    ]


def _located(detail: ErrorDetails, model: type[Options]) -> dict[str, Any]:
    """A pydantic error as a query parameter's, an unknown parameter's message naming the known ones."""
    located: dict[str, Any] = {"type": detail["type"], "loc": ("query", *detail["loc"]), "msg": detail["msg"]}
    if detail["type"] == "extra_forbidden":
        located["msg"] = f"unknown option; this endpoint takes {', '.join(model.model_fields)}"
    return located


def parameters(model: type[Options]) -> dict[str, Any]:
    """`openapi_extra` documenting `model`'s fields as optional query parameters."""
    schema = model.model_json_schema(mode="validation")
    listed = []
    for name, field in schema["properties"].items():
        field = _not_null(field)
        description = field.get("description")
        listed.append(
            {"name": name, "in": "query", "required": False, "schema": field}
            | ({"description": description} if description else {})
        )
    return {"parameters": listed}


def _not_null(field: dict[str, Any]) -> dict[str, Any]:
    """`field`'s schema as a query parameter's: a query string cannot carry null (`?seed=` is not a number),
    so an optional value (`int | None`, None by default) is documented as its other branch, to be left out."""
    branches = field.get("anyOf", [])
    if {"type": "null"} not in branches:
        return dict(field)
    rest = [branch for branch in branches if branch != {"type": "null"}]
    documented = {
        key: value for key, value in field.items() if key != "anyOf" and (key, value) != ("default", None)
    }
    return documented | (rest[0] if len(rest) == 1 else {"anyOf": rest})
