"""Open Inference Protocol (KServe v2 REST): the encoder and the decoder as two models, for Triton and KServe
clients.

The models are the ONNX graphs as the model card describes them (names, FP32, -1 for the batch axis). An
inference goes through the same `Model.encode_async` / `decode_async` as /encode and /decode (batching
included), so `x` is images in [0, 1]. Tensors travel as JSON `data` or, with Triton's binary tensor data
extension, as raw little-endian bytes after the JSON header (`Inference-Header-Content-Length`). Errors are
`{"error": "..."}`: 400 for a request that is not a valid inference request, 404 for an unknown model, 415
for a compressed body, 422 for a valid request this model cannot run (names, datatypes, shapes, values), 503
before the model is loaded; the guards' refusals and unknown paths under /v2 have that shape too
(`service.main` and `service.api.guards` ask `is_protocol_path`; not a refused CORS preflight, which
Starlette answers in plain text). Each model has one version, unnamed: the protocol's versioned paths
(`/v2/models/{name}/versions/{version}/...`) answer 404 with the path to use instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import APIRouter, HTTPException, Path, Request, Response, status
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.config import JsonValue

from service.api.bodies import (
    BodyBytes,
    first_repeated_key,
    json_keys,
    more_values_than,
    quoted,
    read_whole,
    repeated_key,
    request_body,
)
from service.api.deps import ModelDep, SettingsDep, not_stalled
from service.api.responses import NOT_LOADED, NOT_READY, STALLED, NumpyJSONResponse
from service.config import Settings
from service.model_card import OnnxFile, TensorSpec
from service.runtime import Floats, Graph, Model
from service.schemas import EXAMPLES_LATENT_DIM, LATENT_EXAMPLES

__all__ = ["router"]

# The header that splits a body into its JSON part and the binary tensor data after it.
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = "application/octet-stream"
SERVER_NAME = "vae-service"
# What Triton calls a model run by ONNX Runtime.
PLATFORM = "onnxruntime_onnx"
# Protocol datatypes of the model card's dtypes.
DATATYPES = {"float32": "FP32"}
# Input values beyond this are neither images nor latents of this model, and could overflow float32 inside it.
_VALUE_BOUND = 1e6
# Commas of a request's JSON that are not between values: its keys, parameters and outputs.
_STRUCTURE_COMMAS = 256
# Input names a 422 for the wrong inputs lists; the rest are counted.
_NAMES_LISTED = 4
# Longest shape or size from the request shown in an error; longer ones are cut.
_SHOWN_CHARS = 64


class ProtocolError(BaseModel):
    """An error, as the protocol writes it."""

    error: str


class ServerMetadata(BaseModel):
    """The server and the protocol extensions it supports."""

    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    """One input or output of a model; -1 marks the batch axis."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """A model's inputs and outputs."""

    name: str
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# `parameters`, where `null` is no parameters (KServe's and MLServer's request models allow it).
Parameters = Annotated[dict[str, Any], BeforeValidator(lambda value: {} if value is None else value)]


class RequestInput(_Strict):
    """One input tensor: `data` (flat or nested, row-major) or `parameters.binary_data_size` bytes."""

    name: str
    # Checked by `_input_tensor`, not here: pydantic would read true or 16.0 as an integer, and a wrong shape
    # is a 422 naming the field like the others.
    shape: list[Any]
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestOutput(_Strict):
    """An output to return; `parameters.binary_data` asks for it as raw bytes."""

    name: str
    parameters: Parameters = Field(default_factory=dict)


def _examples(d: int) -> list[JsonValue]:
    """The documented request, for a decoder of `d` latents (tests post it to /v2/models/decoder/infer, of
    the default model and of another latent_dim)."""
    return [{"inputs": [{"name": "z", "shape": [1, d], "datatype": "FP32", "data": [0.0] * d}]}]


class InferenceRequest(_Strict):
    """An inference request; without `outputs`, every output is returned."""

    # Merged with _Strict's (extra="forbid").
    model_config = ConfigDict(json_schema_extra={"examples": _examples(EXAMPLES_LATENT_DIM)})

    id: str | None = None
    # KServe's client names the model in the body as well as in the path; it must be the path's.
    model_name: str | None = None
    model_version: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


LATENT_EXAMPLES[InferenceRequest.__name__] = _examples

# The names a request can give twice, silently, in one object: the schema's, and the parameters read here.
_KEYS = frozenset(
    (
        *json_keys(InferenceRequest),
        *(json.dumps(name).encode() for name in ("binary_data_size", "binary_data", "binary_data_output")),
    )
)


class ResponseOutput(BaseModel):
    """One output tensor: `data` (flat, row-major) or `parameters.binary_data_size` bytes after the JSON."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferenceResponse(BaseModel):
    """The outputs of one inference."""

    model_name: str
    id: str | None = None
    outputs: list[ResponseOutput]


PREFIX = "/v2"


def is_protocol_path(path: str) -> bool:
    """Whether `path` is under this protocol's prefix: its errors, the guards' included, are `{"error"}`."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_key(path: str) -> str:
    """The key of an error's message at `path`: the protocol's `error` under /v2, else FastAPI's `detail`."""
    return "error" if is_protocol_path(path) else "detail"


def protocol_error(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """An error as the protocol writes it (Triton's clients read the message from `error`)."""
    return NumpyJSONResponse({"error": message}, status_code=status_code, headers=headers)


def _errors(*statuses: int, unavailable: str = NOT_LOADED) -> dict[int | str, dict[str, Any]]:
    reasons = {
        400: "The request is not a valid inference request (JSON, its schema, or the binary data sizes).",
        404: "No model of that name: the models are encoder and decoder.",
        415: "A compressed (Content-Encoding) body.",
        422: "A request this model cannot run: input or output names, datatype, shape, count or values.",
        503: unavailable,
    }
    return {code: {"model": ProtocolError, "description": reasons[code]} for code in statuses}


router = APIRouter(prefix=PREFIX, tags=["open inference protocol"])


def _unknown_model(name: str) -> HTTPException:
    return HTTPException(
        status.HTTP_404_NOT_FOUND,
        detail=f"model {quoted(name)} is not served here; the models: encoder, decoder",
    )


def _graph(model: Model, name: str) -> OnnxFile:
    """The card's entry for the model called `name`; 404 for any other name."""
    if name == "encoder":
        return model.card.encoder
    if name == "decoder":
        return model.card.decoder
    raise _unknown_model(name)


def _no_versions(model_name: str, rest: str) -> HTTPException:
    """404 for a versioned path (the protocol's optional `/versions/{version}`), naming the path to use."""
    if model_name not in ("encoder", "decoder"):
        return _unknown_model(model_name)
    return HTTPException(
        status.HTTP_404_NOT_FOUND,
        detail=f"model versions are not served; use /v2/models/{model_name}{rest}",
    )


def _shape(spec: TensorSpec) -> list[int]:
    """The card's shape as the protocol writes it: -1 for the batch axis (null in the card)."""
    return [-1 if dim is None else dim for dim in spec.shape]


def _metadata(spec: TensorSpec) -> TensorMetadata:
    return TensorMetadata(name=spec.name, datatype=DATATYPES[spec.dtype], shape=_shape(spec))


@router.get("", summary="Server metadata", response_model=ServerMetadata)
async def server_metadata(request: Request) -> ServerMetadata:
    """The server's name and version, and `binary_tensor_data`: tensors may travel as raw bytes."""
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=["binary_tensor_data"])


@router.get(
    "/health/live",
    summary="Server liveness",
    response_model=ServerLive,
    responses=_errors(503, unavailable=STALLED),
)
async def server_live(request: Request) -> ServerLive:
    """The process answers, and its model runs return (like /health)."""
    not_stalled(request)
    return ServerLive(live=True)


@router.get(
    "/health/ready",
    summary="Server readiness",
    response_model=ServerReady,
    responses=_errors(503, unavailable=NOT_READY),
)
async def server_ready(request: Request, model: ModelDep) -> ServerReady:
    """Both models are loaded and warmed up, and their runs return (like /ready); 503 otherwise."""
    not_stalled(request)
    return ServerReady(ready=True)


@router.get(
    "/models/{model_name}",
    summary="Model metadata",
    response_model=ModelMetadata,
    responses=_errors(404, 503),
)
async def model_metadata(model_name: str, model: ModelDep) -> ModelMetadata:
    """The inputs and outputs of `encoder` (x -> mu, logvar) or `decoder` (z -> x_mean, logits)."""
    graph = _graph(model, model_name)
    return ModelMetadata(
        name=model_name,
        platform=PLATFORM,
        inputs=[_metadata(spec) for spec in graph.inputs],
        outputs=[_metadata(spec) for spec in graph.outputs],
    )


@router.get(
    "/models/{model_name}/ready",
    summary="Model readiness",
    response_model=ModelReady,
    responses=_errors(404, 503, unavailable=NOT_READY),
)
async def model_ready(request: Request, model_name: str, model: ModelDep) -> ModelReady:
    """The model is loaded and warmed up, and its runs return (like /ready, for this model alone)."""
    _graph(model, model_name)
    not_stalled(request, "encoder" if model_name == "encoder" else "decoder")
    return ModelReady(name=model_name, ready=True)


@router.post(
    "/models/{model_name}/infer",
    summary="Inference",
    response_model=InferenceResponse,
    responses={
        200: {"content": {BINARY: {"schema": {"type": "string", "format": "binary"}}}},
        **_errors(400, 404, 415, 422, 503),
    },
    openapi_extra=request_body(InferenceRequest, images=False)
    | {
        "parameters": [
            {
                "name": HEADER_LENGTH,
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
                "description": "Bytes of JSON at the start of the body, binary tensors after it (Triton's "
                "binary tensor data extension); without it the body is JSON alone.",
            }
        ]
    },
)
async def infer(
    request: Request,
    model_name: Annotated[str, Path(examples=["decoder"])],
    model: ModelDep,
    settings: SettingsDep,
) -> Response:
    """Run `encoder` on images x (N, 1, 8, 8 for the default model) or `decoder` on latents z (N, D).

    The body is JSON, or (with `Inference-Header-Content-Length`) JSON followed by the binary input tensors.
    Outputs asked for with `binary_data` (or all, with the request parameter `binary_data_output`) come back
    as raw bytes after the JSON, whose length is then in the response's `Inference-Header-Content-Length`.
    """
    graph = _graph(model, model_name)
    header, binary = await _split_body(request)
    _refuse_too_many_values(header, model, settings)
    query = _parse(header, framed=HEADER_LENGTH in request.headers)
    if query.model_name not in (None, model_name):
        raise _invalid(f"model_name is {quoted(query.model_name)} but the path names {model_name}")
    if query.model_version not in (None, ""):
        raise _invalid(
            f"model_version is {quoted(query.model_version)}; model versions are not served (leave it out)"
        )
    (spec,) = graph.inputs
    if [given.name for given in query.inputs] != [spec.name]:
        names = ", ".join(quoted(given.name) for given in query.inputs[:_NAMES_LISTED])
        if len(query.inputs) > _NAMES_LISTED:
            names += f" and {len(query.inputs) - _NAMES_LISTED} more"
        raise _unrunnable(f"inputs are {names}; model {model_name} takes one input, {spec.name!r}")
    if model_name == "encoder":
        limit, setting = settings.max_images, "max_images"
    else:
        limit, setting = settings.max_latents, "max_latents"
    tensor = _input_tensor(query.inputs[0], spec, binary, model_name, limit, setting)
    low, high = model.card.input.pixel_range
    if model_name == "encoder" and not (low <= tensor.min() and tensor.max() <= high):
        # As /encode reads them: an image's pixels are in this range, and an encoder knows no other.
        values = _values("inputs[0]", binary=bool(binary))
        raise _unrunnable(f"{values} holds values outside [{low:g}, {high:g}], the encoder's pixel range")
    outputs = _requested_outputs(query, graph, model_name)
    # The graph runs on the tensor as sent: an encoder's x is already in its pixel range (/encode maps images
    # read in [0, 1] there; mapped again here, a card's range other than [0, 1] would be applied twice).
    name: Graph = "encoder" if model_name == "encoder" else "decoder"
    results = await model.infer(name, np.ascontiguousarray(tensor, dtype=np.float32))
    named = dict(zip((spec.name for spec in graph.outputs), results, strict=True))
    return _respond(model_name, query.id, [(name, named[name], as_binary) for name, as_binary in outputs])


# The protocol's versioned paths, answered (not offered, so left out of the OpenAPI schema) so that a client
# naming a version learns that none is served, in the protocol's error shape rather than a bare 404.
_VERSIONED = "/models/{model_name}/versions/{model_version}"


@router.get(_VERSIONED, include_in_schema=False)
async def versioned_model_metadata(model_name: str, model_version: str) -> Response:
    """404: no model versions are served."""
    raise _no_versions(model_name, "")


@router.get(f"{_VERSIONED}/ready", include_in_schema=False)
async def versioned_model_ready(model_name: str, model_version: str) -> Response:
    """404: no model versions are served."""
    raise _no_versions(model_name, "/ready")


@router.post(f"{_VERSIONED}/infer", include_in_schema=False)
async def versioned_infer(model_name: str, model_version: str) -> Response:
    """404: no model versions are served (the body is not read)."""
    raise _no_versions(model_name, "/infer")


async def _split_body(request: Request) -> tuple[BodyBytes, BodyBytes]:
    """(JSON header, binary tensor data) of the request body."""
    body = await read_whole(request)
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return body, b""
    length = _header_length(value, len(body))
    return body[:length], body[length:]


def _header_length(value: str, body_size: int) -> int:
    """`Inference-Header-Content-Length`: ASCII digits, at most the body's size.

    Spaces and tabs around it are accepted: they are not part of an HTTP field value (RFC 9110, 5.5), and
    servers such as uvicorn's h11 strip them before the app sees the header, so every server reads the same.
    Anything else (a sign, inner spaces, other digits than 0-9, nothing) is refused.
    """
    digits = value.strip(" \t")
    if not (digits.isascii() and digits.isdigit()):
        raise _invalid(f"{HEADER_LENGTH} is {quoted(value)}; it must be a plain non-negative integer")
    # int() refuses more than 4300 digits (sys.int_max_str_digits); a number with more digits than the body's
    # size is past the body anyway.
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(body_size)) or int(significant) > body_size:
        raise _invalid(f"{HEADER_LENGTH} is {quoted(value)} but the body has {body_size} bytes")
    return int(significant)


def _refuse_too_many_values(header: BodyBytes, model: Model, settings: Settings) -> None:
    """422 for JSON of more values than twice what any request within the limits holds, before parsing it.

    As for the other routes (`service.api.bodies`): 16 MiB of numbers took 1.5 s and 400 MB to parse and
    check, on the event loop.
    """
    spec = model.card.input
    pixels = spec.channels * spec.height * spec.width
    most = 2 * max(settings.max_images * pixels, settings.max_latents * model.latent_dim) + _STRUCTURE_COMMAS
    if more_values_than(header, most):
        raise _unrunnable(
            f"the request holds more than {most} values; one within this server's limits "
            f"(VAE_MAX_IMAGES, VAE_MAX_LATENTS) holds at most {most // 2}"
        )


def _parse(header: BodyBytes, *, framed: bool) -> InferenceRequest:
    """The request's JSON (the body, or its first `Inference-Header-Content-Length` bytes when `framed`)."""
    problem = repeated_key(header, _KEYS)
    if problem is not None:
        raise _invalid(problem)
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as error:
        details = error.errors(include_url=False, include_input=False, include_context=False)
        problems = "; ".join(f"{'.'.join(map(str, d['loc'])) or 'body'}: {d['msg']}" for d in details)
        if details[0]["type"] == "json_invalid":
            if framed:  # the JSON is cut short or runs into the binary data
                problems = f"the body's first {len(header)} bytes ({HEADER_LENGTH}) are no JSON: {problems}"
            elif b"binary_data_size" in header:
                problems += f"; a body with binary tensor data gives the size of its JSON in {HEADER_LENGTH}"
        raise _invalid(problems) from None
    # Names of the free-form parameters are known only once parsed, and one given twice lost a value in the
    # parse: parsed again for them (once: a scan of the body per name, on the event loop, would cost as
    # many times as a client sends names).
    if not _parameter_names(request) <= _KEYS:
        problem = first_repeated_key(header)
        if problem is not None:
            raise _invalid(problem)
    return request


def _parameter_names(request: InferenceRequest) -> set[bytes]:
    """The names in the request's `parameters` objects and in their values, quoted as in the JSON."""
    names: set[bytes] = set()
    pending: list[Any] = [request.parameters, *(given.parameters for given in request.inputs)]
    pending.extend(output.parameters for output in request.outputs or [])
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            names.update(json.dumps(name, ensure_ascii=False).encode() for name in node)
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return names


def _invalid(message: str) -> HTTPException:
    return HTTPException(status.HTTP_400_BAD_REQUEST, detail=message)


def _unrunnable(message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=message)


def _flag(parameters: dict[str, Any], name: str, where: str, default: bool = False) -> bool:
    """A boolean parameter, `default` when absent."""
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise _invalid(f"{where}.parameters.{name} is {quoted(value)}; it must be true or false")
    return value


def _refuse_unsupported(parameters: dict[str, Any], where: str, known: str) -> None:
    """422 for the protocol's extensions this server does not run; 400 for a name of the binary tensor data
    extension other than `known`, the one that applies here (a misspelt `binary_data` would be ignored, and
    the output come back as JSON). Other parameters are free-form in the protocol (tritonclient's `timeout`,
    `priority` and `sequence_*`, a codec's `content_type`): they do not change what these models compute."""
    for name, what in (("shared_memory_region", "shared memory"), ("classification", "classification")):
        if name in parameters:
            raise _unrunnable(f"{where}.parameters.{name}: {what} is not supported by this server")
    for name in parameters:
        if name.startswith("binary") and name != known:
            raise _invalid(
                f"{where}.parameters has {quoted(name)}, which is not a parameter of the binary tensor data "
                f"extension here; {where} takes {known}"
            )


def _input_tensor(
    given: RequestInput, spec: TensorSpec, binary: BodyBytes, model_name: str, limit: int, setting: str
) -> Floats:
    """The input as an array of the graph's shape, checked against the card and the server's limits."""
    where = "inputs[0]"
    _refuse_unsupported(given.parameters, where, "binary_data_size")
    datatype = DATATYPES[spec.dtype]
    if given.datatype != datatype:
        raise _unrunnable(
            f"{where}.datatype is {quoted(given.datatype)}; {model_name}'s {spec.name} is {datatype}"
        )
    if not all(type(dim) is int and dim >= 0 for dim in given.shape):  # type(): true is an int to isinstance
        raise _unrunnable(
            f"{where}.shape is {_shown(given.shape)}; it must be a list of non-negative integers"
        )
    expected = _shape(spec)
    shape: list[int] = given.shape
    if len(shape) != len(expected) or any(
        dim not in (-1, size) for dim, size in zip(expected, shape, strict=True)
    ):
        raise _unrunnable(f"{where}.shape is {_shown(shape)}; {model_name}'s {spec.name} is {expected}")
    if not 1 <= shape[0] <= limit:
        raise _unrunnable(
            f"{where}.shape has a batch of {_shown(shape[0])}; this server takes 1 to {limit} "
            f"(VAE_{setting.upper()})"
        )
    count = math.prod(shape)
    array: npt.NDArray[Any]
    if "binary_data_size" in given.parameters:
        size = given.parameters["binary_data_size"]
        if given.data is not None:
            raise _invalid(f"{where} has both data and parameters.binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool):
            raise _invalid(
                f"{where}.parameters.binary_data_size is {quoted(size)}; it must be an integer (bytes)"
            )
        if size != len(binary):
            raise _invalid(
                f"{where}.parameters.binary_data_size is {_shown(size)} but {len(binary)} bytes follow "
                "the JSON"
            )
        if size != 4 * count:
            raise _unrunnable(f"{where} has {size} bytes; shape {shape} of {datatype} takes {4 * count}")
        array = np.frombuffer(binary, dtype="<f4")
    else:
        if binary:
            raise _invalid(f"{len(binary)} bytes follow the JSON but {where} has no binary_data_size")
        if given.data is None:
            raise _invalid(f"{where} has neither data nor parameters.binary_data_size")
        array = _json_numbers(given.data, where, datatype, shape)
        if array.size != count:
            raise _unrunnable(f"{where}.data has {array.size} values; shape {shape} takes {count}")
        if array.ndim > 1 and not _follows(list(array.shape), shape):
            raise _unrunnable(
                f"{where}.data is nested as {list(array.shape)}, which does not follow its shape {shape}: "
                "nest it as the shape, the innermost list holding the rest flat if need be, or send it flat"
            )
    if not np.isfinite(array).all():
        raise _unrunnable(f"{_values(where, binary=bool(binary))} holds NaN or infinite values")
    if np.abs(array).max() > _VALUE_BOUND:
        raise _unrunnable(f"{_values(where, binary=bool(binary))} holds values beyond ±{_VALUE_BOUND:g}")
    return np.ascontiguousarray(array, dtype=np.float32).reshape(shape)


def _values(where: str, *, binary: bool) -> str:
    """What an error calls an input's values: its binary data, or its `data` field."""
    return f"{where}'s binary data" if binary else f"{where}.data"


def _shown(value: object) -> str:
    """A shape or a size from the request, as JSON, cut past _SHOWN_CHARS characters."""
    text = json.dumps(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def _follows(nesting: list[int], shape: list[int]) -> bool:
    """Whether data nested as `nesting` is a tensor of `shape` in row-major order: its lists are the shape's
    dimensions, from the outside in, but the innermost, which may hold the remaining dimensions flat
    (`[2, 64]` for `[2, 1, 8, 8]`: a batch of flat images), dimensions of 1 aside (`[8, 8]` for
    `[1, 1, 8, 8]`; `_json_numbers` has refused data nested deeper than the shape): those move no value.
    The protocol allows the tensor's own nesting or none; Triton reads any nesting as flat, which would run
    a transposed batch as other inputs."""
    *outer, inner = [size for size in nesting if size != 1] or [1]
    dims = [size for size in shape if size != 1]
    return outer == dims[: len(outer)] and inner == math.prod(dims[len(outer) :])


def _json_numbers(data: list[Any], where: str, datatype: str, shape: list[int]) -> npt.NDArray[np.float64]:
    """JSON `data` (flat or nested lists, at most as deep as `shape`) as an array; 422 unless every value is a
    number (true is not 1).

    Checked level by level before numpy reads it: numpy would read a boolean among numbers as 1 or 0.
    """
    depth, level = 1, data
    while True:
        deeper: list[Any] = []
        nested = False  # a list at this level, empty ones included
        for item in level:
            if isinstance(item, list):
                nested = True
                deeper.extend(item)
            elif type(item) not in (int, float):  # type(): to isinstance, true is an int
                raise _unrunnable(
                    f"{where}.data holds something other than numbers ({_json_kind(item)}); "
                    f"{datatype} data is JSON numbers"
                )
        if not nested:
            break
        depth, level = depth + 1, deeper
    if depth > len(shape):
        raise _unrunnable(
            f"{where}.data is nested {depth} lists deep; shape {shape} has {len(shape)} dimensions"
        )
    try:
        return np.asarray(data, dtype=np.float64)
    except ValueError:
        raise _unrunnable(f"{where}.data is ragged: its nested lists differ in length") from None
    except OverflowError:  # an integer past float64's range
        raise _unrunnable(f"{where}.data holds values beyond ±{_VALUE_BOUND:g}") from None


def _json_kind(value: Any) -> str:
    """A JSON value that is neither a number nor a list, as an error message names it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return "a string" if isinstance(value, str) else "an object"


def _requested_outputs(query: InferenceRequest, graph: OnnxFile, model_name: str) -> list[tuple[str, bool]]:
    """(output name, as binary) in the order asked for; every output when none are named."""
    _refuse_unsupported(query.parameters, "request", "binary_data_output")
    all_binary = _flag(query.parameters, "binary_data_output", "request")
    names = [spec.name for spec in graph.outputs]
    if query.outputs is None:
        return [(name, all_binary) for name in names]
    if not query.outputs:  # the model would run for an answer of nothing
        raise _unrunnable(
            f"outputs is empty; leave it out for every output, or name those wanted: {', '.join(names)}"
        )
    requested: list[tuple[str, bool]] = []
    for i, output in enumerate(query.outputs):
        where = f"outputs[{i}]"
        _refuse_unsupported(output.parameters, where, "binary_data")
        if output.name not in names:
            raise _unrunnable(
                f"{where}.name is {quoted(output.name)}; {model_name} outputs are {', '.join(names)}"
            )
        if any(name == output.name for name, _ in requested):
            raise _unrunnable(f"{where}.name {quoted(output.name)} is asked for twice")
        requested.append((output.name, _flag(output.parameters, "binary_data", where, all_binary)))
    return requested


def _respond(model_name: str, request_id: str | None, outputs: list[tuple[str, Floats, bool]]) -> Response:
    """JSON outputs, or the JSON header followed by the binary ones."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array, as_binary in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if as_binary:
            data = np.ascontiguousarray(array, dtype="<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = np.ascontiguousarray(array.ravel())
        entries.append(entry)
    content: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if request_id is not None:
        content["id"] = request_id
    if not chunks:
        return NumpyJSONResponse(content)
    header = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(header + b"".join(chunks), media_type=BINARY, headers={HEADER_LENGTH: str(len(header))})
