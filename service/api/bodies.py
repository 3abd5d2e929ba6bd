"""Reading request bodies: JSON or multipart images, 415 / 422 / 400 with specific details, and their docs.

Routes that take images accept them two ways: multipart `files` (one part per image) or JSON
`{"images": [<base64>, ...]}`. Routes read their own bodies (rather than letting FastAPI parse one fixed
type) because one path takes both; `request_body` documents what they read in the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import numpy as np
import numpy.typing as npt
from fastapi import HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from service import imaging
from service.model_card import InputSpec
from service.schemas import (
    LATENT_EXAMPLES,
    MAX_ITEMS_SETTING,
    SIZED_EXAMPLES,
    ImagesRequest,
    without_shape_tag,
)

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = [
    "JSON",
    "BodyBytes",
    "MULTIPART",
    "Upload",
    "decode_images",
    "json_keys",
    "latent_matrix",
    "more_values_than",
    "parse_json",
    "read_body",
    "read_json",
    "read_whole",
    "quoted",
    "refuse_invert_without_images",
    "first_repeated_key",
    "repeated_key",
    "request_body",
    "validation_error",
]

JSON = "application/json"
MULTIPART = "multipart/form-data"
# The most bytes read before a multipart body's first boundary (a preamble, which is skipped).
_MAX_PREAMBLE = 1024
# The multipart field that carries image files.
FILES_FIELD = "files"
# Longest file name quoted in an error detail; longer ones are cut (they come from the client).
_NAME_CHARS = 64
# RFC 2231's extended file name (`filename*=utf-8''%E2%82%AC.png`), which python-multipart's header parser
# drops: RFC 7578 asks senders not to use it, but a part that carries only it is still a file.
# Quoted strings are matched whole (and passed over), so that a plain name holding `; filename*=` is no
# extended name, nor a `;` inside a quoted extended one its end.
_QUOTED = rb'"(?:\\.|[^"\\])*"'
_EXTENDED_FILENAME = re.compile(_QUOTED + rb"|;\s*filename\*\s*=\s*(" + _QUOTED + rb"|[^;]*)", re.IGNORECASE)

M = TypeVar("M", bound=BaseModel)
# A body as read (`read_whole`), or a part of one.
BodyBytes = bytes | bytearray

# A request's images are decoded on the event loop itself while they are small: files (or a JSON body) of
# at most INLINE_BYTES that decode to at most imaging.SMALL_PIXELS together, about a third of a millisecond.
# The loop stops at the first image whose header, as its decoder reads it, says more (before decompressing
# it), or whose format's header does not bound the decoding (imaging.SIZED_FORMATS), and the request is
# decoded again on the one image-decoding thread; so is a request of more bytes (a small image padded with
# a million empty chunks takes a second to read). The thread keeps a request's big images from holding up
# every other request (a 4096 x 4096 PNG takes about 75 ms); being one, it makes large decodes take turns,
# which bounds their memory to one request's, as when they ran on the loop.
INLINE_BYTES = 64 * 1024
_DECODING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-decoding")


@dataclass(frozen=True)
class Upload:
    """One image as received, with the name errors use for it."""

    label: str  # "file 2 ('digit.png')" or "images[2]"
    data: bytes


def validation_error(
    loc: tuple[str | int, ...], message: str, kind: str = "value_error"
) -> RequestValidationError:
    """A 422 shaped like FastAPI's own: `{"detail": [{"type", "loc", "msg"}]}`."""
    return RequestValidationError([{"type": kind, "loc": loc, "msg": message}])


def refuse_invert_without_images(invert: bool) -> None:
    """`invert` flips uploaded images: a JSON body of latents has none to flip (422, not ignored)."""
    if invert:
        raise validation_error(
            ("query", "invert"), "invert=true flips uploaded images; this JSON body has none (send images)"
        )


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def _unsupported(media_type: str, accepted: str) -> HTTPException:
    return HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        detail=f"content type {quoted(media_type or '(none)')} is not supported here; send {accepted}",
    )


def _state(request: Request) -> Mapping[str, Any]:
    """What the lifespan put in the request's scope (`service.main.State`); empty outside it."""
    state: Mapping[str, Any] = request.scope.get("state") or {}
    return state


async def read_whole(request: Request) -> bytearray:
    """The whole body, read into one growing buffer. Starlette's `request.body()` keeps a list of chunks
    until it joins them, which leaves them behind in the heap; with that change and JSON parsed on the
    decoding thread, 128 bodies of 16 MiB at once peaked at 2.2 GiB instead of 4.2 (bench/burst.py)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


async def _read_json_bytes(request: Request) -> BodyBytes:
    """The whole body, once it is known to be JSON; 422 for more values than any request within the limits
    holds (`_refuse_too_many_values`)."""
    body = await read_whole(request)
    _refuse_too_many_values(request, body)
    return body


def _refuse_too_many_values(request: Request, body: BodyBytes) -> None:
    """422 for a JSON body of more values than twice what a request within the limits can hold, unvalidated.

    Validation reports every wrong value, and pydantic builds each error (about 350 bytes and 0.4 us) before
    any could be left out: a 16 MiB body of 4 million wrong values took 1.7 s and 1.5 GB in pydantic alone.
    The most a request holds is the mu and logvar of VAE_MAX_LATENTS posteriors and a target (/kl), or
    VAE_MAX_IMAGES images, each perhaps a data: URL with a comma of its own. Values are counted by the commas
    between them, a byte count that needs no parsing; twice that bound leaves a body a little past the
    limits to get the route's own, more specific, 422.
    """
    state = _state(request)
    settings, model = state.get("settings"), state.get("model")
    if settings is None or model is None:
        return
    most = 2 * (2 * (settings.max_latents + 1) * model.latent_dim + 2 * settings.max_images)
    if more_values_than(body, most):
        raise validation_error(
            ("body",),
            f"the body holds more than {most} values; requests within this server's limits "
            f"(VAE_MAX_LATENTS, VAE_MAX_IMAGES) hold at most {most // 2}",
            "too_many_values",
        )


def more_values_than(body: BodyBytes, most: int) -> bool:
    """Whether JSON `body` holds more than `most` values, counted by the commas between them, unparsed."""
    return len(body) > most and body.count(b",") >= most


async def read_json(request: Request, model: type[M]) -> M:
    """The body as `model`; 415 unless it is JSON, 422 naming the fields that are wrong."""
    media_type = _media_type(request)
    if media_type != JSON:
        raise _unsupported(media_type, JSON)
    return parse_json(model, await _read_json_bytes(request))


async def read_body(request: Request, *, max_files: int) -> BodyBytes | list[Upload]:
    """The JSON bytes (parsed by the caller), or the multipart image files; 415 for anything else.

    A multipart body is read part by part: 400 when it is not valid multipart, 422 for a part that is not
    an image file named `files` or for more than `max_files` of them, and nothing is kept of a refused body.
    """
    media_type = _media_type(request)
    if media_type == JSON:
        return await _read_json_bytes(request)
    if media_type != MULTIPART:
        raise _unsupported(media_type, f"{JSON} or {MULTIPART} (images in parts named '{FILES_FIELD}')")
    _, params = parse_options_header(request.headers["content-type"])
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail=f"the content type has no boundary: send {MULTIPART}; boundary=<the parts' separator>",
        )
    files = _Files(max_files)
    delimiter = b"--" + boundary
    preamble: bytes | None = b""  # what comes before the first delimiter, until it has come
    try:
        parser = MultipartParser(boundary, files.callbacks())
        async for chunk in request.stream():
            if preamble is not None:
                chunk, preamble = _after_preamble(preamble + chunk, delimiter)
            parser.write(chunk)
        if preamble:
            raise FormParserError(f"no boundary ({quoted(delimiter.decode('latin-1'))}) in the body")
        parser.finalize()
    except FormParserError as error:  # python-multipart's messages name the fault and its offset, not data
        detail = f"the body is not valid {MULTIPART}: {error}"
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=detail) from None
    if not files.ended:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, detail=f"the {MULTIPART} body ends before its closing boundary"
        )
    if not files.uploads:
        raise validation_error(
            ("body", FILES_FIELD), f"no images: send one multipart part named '{FILES_FIELD}' per image"
        )
    return files.uploads


def _after_preamble(start: bytes, delimiter: bytes) -> tuple[bytes, bytes | None]:
    """(the body from its first `delimiter` on, None) once `start` holds it; else (b"", `start`) to wait for
    more. RFC 2046 lets text come before it (a preamble, which some MIME writers add); the parser takes none.
    """
    if start.startswith(delimiter):
        return start, None
    window = _MAX_PREAMBLE + len(b"\r\n" + delimiter)  # however the body comes in chunks
    at = start.find(b"\r\n" + delimiter, 0, window)
    if at >= 0:
        if delimiter in start[:at]:  # a boundary with no line break before it: the body is not well formed
            raise FormParserError("the body's first boundary does not start a line")
        return start[at + 2 :], None
    if len(start) >= window:
        raise FormParserError(f"no boundary in the first {_MAX_PREAMBLE} bytes")
    return b"", start


class _Files:
    """The image files of a multipart body, collected from python-multipart's parser callbacks.

    Used rather than Starlette's `request.form()`, which spools every part through a temporary file: that
    triples the time a request of small images spends in parsing. Refusals are raised from the callbacks.
    """

    def __init__(self, max_files: int) -> None:
        self.uploads: list[Upload] = []
        self.ended = False  # the closing boundary was read
        self._max_files = max_files
        self._parts = 0
        self._header = b""
        self._value = b""
        self._disposition = b""
        self._dispositions = 0  # Content-Disposition headers of the part being read
        self._label = ""
        self._data: list[bytes] = []

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _begin(self) -> None:
        self._disposition, self._dispositions, self._data = b"", 0, []

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
            self._dispositions += 1
        self._header, self._value = b"", b""

    def _headers_finished(self) -> None:
        part = self._parts
        self._parts += 1
        if self._dispositions > 1:  # which one names the part: refused rather than one of them dropped
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                detail=f"multipart part {part} has {self._dispositions} Content-Disposition headers; "
                "send one",
            )
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                detail=f"multipart part {part} has no name (its Content-Disposition header gives none)",
            )
        if name != FILES_FIELD.encode():
            field = name.decode("utf-8", "replace")
            raise validation_error(
                ("body", field[:_NAME_CHARS]),
                f"part {part} is named {quoted(field)}; this endpoint reads image files in parts named "
                f"'{FILES_FIELD}' (options go in the query string)",
            )
        i = len(self.uploads)
        filename = _filename(self._disposition, options)
        if filename is None:
            message = f"{FILES_FIELD}[{i}] is a text field, not a file"
            raise validation_error(("body", FILES_FIELD, i), message)
        if i >= self._max_files:
            raise validation_error(
                ("body", FILES_FIELD),
                f"more than {self._max_files} images sent; this server takes at most {self._max_files} "
                "per request",
            )
        self._label = f"file {i} ({quoted(filename)})"

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(data[start:end])

    def _part_end(self) -> None:
        self.uploads.append(Upload(self._label, b"".join(self._data)))

    def _end(self) -> None:
        self.ended = True


def _filename(disposition: bytes, options: Mapping[bytes, bytes]) -> str | None:
    """The file name a part's Content-Disposition gives, RFC 2231-encoded (`charset'lang'%XX..`, which RFC
    6266 has recipients prefer) or plain; None for a text field, which gives neither."""
    extended = next((m[1] for m in _EXTENDED_FILENAME.finditer(disposition) if m[1] is not None), None)
    if extended is not None:
        value = extended.strip().strip(b'"').decode("latin-1")
        charset, _, rest = value.partition("'")
        _, _, encoded = rest.partition("'")
        # RFC 5987 allows UTF-8 and ISO-8859-1; anything else is read as UTF-8.
        known = charset.lower() in ("iso-8859-1", "latin-1", "latin1")
        return unquote(
            encoded if rest else value, encoding="iso-8859-1" if known else "utf-8", errors="replace"
        )
    if b"filename" in options:
        return options[b"filename"].decode("utf-8", "replace")
    return None


def quoted(value: object) -> str:
    """Something the client chose (a file name, a header value, a JSON value) for an error detail: repr'd
    (no control characters) and cut when long, so that a detail never echoes more than a few dozen
    characters of it."""
    if isinstance(value, str) and len(value) > _NAME_CHARS:
        return repr(value[:_NAME_CHARS]) + "..."
    text = repr(value)
    return text if len(text) <= _NAME_CHARS + 2 else text[:_NAME_CHARS] + "..."


@cache
def json_keys(model: type[BaseModel]) -> tuple[bytes, ...]:
    """Every property name in `model`'s JSON schema, nested models' included, as quoted JSON strings."""
    names: set[str] = set()
    pending: list[Any] = [model.model_json_schema()]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if isinstance(node.get("properties"), dict):
                names.update(node["properties"])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return tuple(json.dumps(name).encode() for name in sorted(names))


def repeated_key(body: BodyBytes, keys: Iterable[bytes]) -> str | None:
    """What is wrong when one JSON object in `body` holds a key twice, or None (also for a body that is not
    JSON: validation says what is wrong with that).

    Parsers keep the last value of a repeated key and drop the others without a word. `keys` (quoted, as
    `json_keys` gives them) are the names the request's objects have: the body is parsed again, with each
    object's pairs in hand, only when one of them occurs twice in it or it holds an escape (a name could be
    spelt with one). On other bodies that costs a scan per name, about a nanosecond a byte: 3 us for
    /decode's 16 latents, 1 % of the request.
    """
    if b"\\" not in body and all(body.count(key) < 2 for key in keys):
        return None
    return first_repeated_key(body)


def first_repeated_key(body: BodyBytes) -> str | None:
    """What `repeated_key` says, found by parsing `body` (for names not known before it is parsed)."""
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for name, _ in items:
            if name in seen and not repeated:
                repeated.append(name)
            seen.add(name)
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None
    if not repeated:
        return None
    return f"the key {quoted(repeated[0])} appears twice in one JSON object; send each key once"


def parse_json(model: type[M], body: BodyBytes) -> M:
    """Validate JSON bytes as `model`; errors become a 422 located in the body (inputs are not echoed).

    A key given twice in one object is a 422 too, rather than the last of them being served.
    """
    problem = repeated_key(body, json_keys(model))
    if problem is not None:
        raise validation_error(("body",), problem, "repeated_key")
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        details = error.errors(include_url=False, include_input=False, include_context=False)
        raise RequestValidationError(
            [{**detail, "loc": ("body", *without_shape_tag(detail["loc"]))} for detail in details]
        ) from None


async def decode_images(
    body: BodyBytes | list[Upload],
    spec: InputSpec,
    *,
    invert: bool,
    limit: int,
    max_pixels: int,
    max_request_pixels: int,
) -> imaging.Floats:
    """(N, C, H, W) model tensors from JSON `{"images": [...]}` bytes or multipart uploads.

    422 past `limit` images; 400 naming the first empty or unreadable one, 413 the first of more than
    `max_pixels` pixels and the one that brings the images past `max_request_pixels` together. Small
    requests are read on the event loop, others on the image-decoding thread (INLINE_BYTES), a JSON body's
    base64 included: parsing 16 MiB of it takes 45 ms, and while requests wait their turn they hold only
    their bodies, not the images' bytes besides.
    """

    def read(inline_pixels: int | None = None) -> imaging.Floats:
        uploads = _uploads(body, limit)
        return _decode(
            uploads,
            spec,
            invert=invert,
            max_pixels=max_pixels,
            max_request_pixels=max_request_pixels,
            inline_pixels=inline_pixels,
        )

    size = sum(len(upload.data) for upload in body) if isinstance(body, list) else len(body)
    if size <= INLINE_BYTES:
        body = _uploads(body, limit)  # parsed once: the thread reads the same uploads if they are not small
        try:
            return read(inline_pixels=imaging.SMALL_PIXELS)
        except _NotSmall:
            pass
    # The request's context goes along, so that what the decoding logs carries its request id.
    return await asyncio.get_running_loop().run_in_executor(_DECODING, copy_context().run, read)


def _uploads(body: BodyBytes | list[Upload], limit: int) -> list[Upload]:
    """The images of a JSON body (parsed here) or multipart uploads; 422 past `limit` of them."""
    if isinstance(body, list):
        field, uploads = FILES_FIELD, body
    else:
        field = "images"
        uploads = [
            Upload(f"images[{i}]", data) for i, data in enumerate(parse_json(ImagesRequest, body).images)
        ]
    if len(uploads) > limit:
        raise validation_error(
            ("body", field), f"{len(uploads)} images sent; this server takes at most {limit} per request"
        )
    return uploads


class _NotSmall(Exception):
    """The images are not for the event loop to decode (too many pixels, another format, or an error)."""


def _decode(
    uploads: list[Upload],
    spec: InputSpec,
    *,
    invert: bool,
    max_pixels: int,
    max_request_pixels: int,
    inline_pixels: int | None = None,
) -> imaging.Floats:
    """The uploads as model tensors. With `inline_pixels` (on the event loop), _NotSmall once the images come
    to more pixels, or for an image in a format not in imaging.SIZED_FORMATS or one that cannot be read: the
    decoding thread then reads the request from the start, and gives the answer."""
    decoded, pixels = [], 0
    formats = None if inline_pixels is None else imaging.SIZED_FORMATS
    for upload in uploads:
        limit = max_pixels if inline_pixels is None else min(max_pixels, inline_pixels - pixels)
        try:
            image = imaging.read_pixels(
                upload.data,
                spec,
                invert=invert,
                max_pixels=limit,
                budget=max_request_pixels - pixels,
                formats=formats,
                limit_python=True,
            )
        except imaging.ImageError as error:
            if inline_pixels is not None:
                raise _NotSmall from None
            if isinstance(error, imaging.OverBudget):  # found from its header, before decoding it
                raise _over_budget(upload, pixels + error.pixels, max_request_pixels) from error
            too_large = isinstance(error, imaging.ImageTooLarge)
            code = status.HTTP_413_CONTENT_TOO_LARGE if too_large else status.HTTP_400_BAD_REQUEST
            raise HTTPException(code, detail=f"{upload.label} {error}") from error
        pixels += image.shape[0] * image.shape[1]
        if pixels > max_request_pixels:  # a format whose header did not give the size decoded
            raise _over_budget(upload, pixels, max_request_pixels)
        decoded.append(image)
    return imaging.to_model(decoded, spec, invert=invert)


def _over_budget(upload: Upload, pixels: int, max_request_pixels: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        detail=f"{upload.label} brings the request's images to {pixels} pixels, more than the "
        f"{max_request_pixels} this server decodes in one request (VAE_MAX_REQUEST_PIXELS)",
    )


def latent_matrix(
    vectors: list[list[float]], latent_dim: int, *, loc: tuple[str, ...], noun: str, limit: int
) -> npt.NDArray[np.float64]:
    """(N, D) from vectors already checked to be finite; 422 naming each vector of the wrong length."""
    if len(vectors) > limit:
        raise validation_error(
            loc, f"{len(vectors)} vectors sent; this server takes at most {limit} per request"
        )
    wrong = [
        {
            "type": "latent_length",
            "loc": (*loc, i),
            "msg": f"{noun} {i} has {len(vector)} values; this model takes {latent_dim}",
        }
        for i, vector in enumerate(vectors)
        if len(vector) != latent_dim
    ]
    if wrong:
        raise RequestValidationError(wrong)
    return np.asarray(vectors, dtype=np.float64).reshape(len(vectors), latent_dim)


def request_body(
    model: type[BaseModel] | None, *, images: bool, image_count: int | None = None
) -> dict[str, Any]:
    """`openapi_extra` documenting what a route reads: `model` as JSON and/or multipart image files, from 1 to
    VAE_MAX_IMAGES of them, or exactly `image_count`."""
    content: dict[str, Any] = {}
    if model is not None:
        schema = _inline_refs(model.model_json_schema())
        content[JSON] = {"schema": schema, "examples": named_examples(schema.get("examples", []))}
        if model.__name__ in LATENT_EXAMPLES:
            content[JSON][SIZED_EXAMPLES] = model.__name__
    if images:
        content[MULTIPART] = {
            "schema": {
                "type": "object",
                "required": [FILES_FIELD],
                "additionalProperties": False,
                "properties": {
                    FILES_FIELD: {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "One part per image file (PNG, JPEG, ...; any mode Pillow reads).",
                        **(
                            {"minItems": 1, MAX_ITEMS_SETTING: "max_images"}
                            if image_count is None
                            else {"minItems": image_count, "maxItems": image_count}
                        ),
                    }
                },
            },
        }
    return {"requestBody": {"required": True, "content": content}}


def named_examples(examples: list[Any]) -> dict[str, Any]:
    """A schema's list of examples as OpenAPI's named examples of a request body (what /docs offers)."""
    return {f"example {i + 1}": {"value": value} for i, value in enumerate(examples)}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace `#/$defs/...` references by the definitions, so the schema stands alone in OpenAPI."""
    definitions: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
