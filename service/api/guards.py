"""What every request passes before any work is done for it: CORS, API key, work in flight, body size.

Plain ASGI middleware, a few microseconds per request, added by `install(app, settings)`, which also writes
their answers into the OpenAPI schema. Every refusal is JSON with a `detail` (under /v2, the Open Inference
Protocol's `error`):

- 401 without an API key and 403 with a wrong one, when VAE_API_KEYS is set (`OPEN_PATHS`, the playground
  page and the API docs stay open);
- 503 with `Retry-After` at once when VAE_MAX_IN_FLIGHT requests are being handled already;
- 413 for a body past VAE_MAX_BODY_BYTES: from its Content-Length before the app runs, or counted while it
  streams in, so that a body without a length, or with a false one, is cut off there and never read whole;
- 400 for a GET or HEAD that comes with a body (a Content-Length above 0, or bytes in chunks) to a path that
  answers GET: nothing here reads one (elsewhere the app answers 404 or 405, as to any GET);
- 415 for a compressed body (a Content-Encoding other than identity), and 408 for a body that takes longer
  than VAE_BODY_TIMEOUT to arrive: both when the route reads it, in that route's error shape.

A 413 or 408 closes the connection: the rest of the body is never read.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from functools import partial
from typing import Any

from fastapi import FastAPI, HTTPException, status
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import request_id
from service.api.bodies import quoted
from service.api.docs import is_docs_path
from service.api.openapi import edit_on_build
from service.api.routes.playground import is_page_path
from service.api.routes.v2 import HEADER_LENGTH, ProtocolError, error_key, is_protocol_path
from service.config import Settings
from service.schemas import ErrorResponse

__all__ = [
    "CLOSE",
    "CORS",
    "OPEN_PATHS",
    "RETRY_AFTER_S",
    "APIKeys",
    "BodyLimit",
    "InFlightLimit",
    "cors_headers",
    "cors_send",
    "install",
    "is_probe",
    "refuse",
]

# Probes and the Prometheus scrape: answered without a key and outside the in-flight bound, so that a busy
# server still reports (the KServe v2 health routes, the server's and each model's, are the same probes for
# Triton/KServe clients: `is_model_ready` on a saturated server must not read as a model not ready).
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready"})
# Each model's readiness, whatever the name (an unknown one is a 404, with or without a key), versioned or
# not (the versioned route answers that there are no versions).
_MODEL_READY = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/ready")
# The same as the OpenAPI schema writes them (route templates).
_OPEN_TEMPLATES = OPEN_PATHS | {"/v2/models/{model_name}/ready"}
# Seconds a client refused for load is told to wait before it tries again.
RETRY_AFTER_S = 1
# The header of a refusal that leaves the rest of the body unread (408, 413): the connection closes after the
# answer, so the client stops sending, and the server stops reading, a body no one will use.
CLOSE = {"Connection": "close"}
# The request headers a page on another origin may send besides the CORS-safelisted ones.
# Inference-Header-Content-Length frames /v2's binary tensor extension, both ways.
_CORS_HEADERS = [
    "Authorization",
    "Content-Type",
    "X-API-Key",
    request_id.HEADER,
    HEADER_LENGTH,
]
# Methods whose requests carry nothing in a body here: one that comes with a body is refused, not ignored
# (`GET /sample` with `{"n": 4}` would otherwise answer 16 samples).
_NO_BODY = frozenset({"GET", "HEAD"})


def is_probe(path: str) -> bool:
    """Whether `path` is one of the probes or the scrape (`OPEN_PATHS`, each model's readiness), with trailing
    slashes or without: a probe configured with one gets its 307 whatever the load."""
    path = path.rstrip("/")
    return path in OPEN_PATHS or (path.endswith("/ready") and _MODEL_READY.fullmatch(path) is not None)


async def refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    code: int,
    detail: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer JSON `{"detail": ...}` (`{"error": ...}` under /v2) without calling the app (nothing of the body
    is read)."""
    response = JSONResponse({error_key(scope["path"]): detail}, status_code=code, headers=headers)
    await response(scope, receive, send)


class BodyLimit:
    """413 for a request body of more than `max_bytes`, declared or counted; 415 for a compressed one; 408 for
    one that has not all arrived `timeout` seconds after the route first reads it.

    Without the time limit, a client that sends the headers and then stalls (or trickles a byte at a time)
    holds its place among VAE_MAX_IN_FLIGHT for as long as it keeps the connection open. The 408 closes the
    connection: what is left of the body is never read. A compressed body is refused rather than inflated
    (it could expand far past `max_bytes`) or read as if it were not (bad JSON or multipart, or a plain body
    mislabelled compressed taken silently).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float, router: Router) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.router = router

    def _detail(self, size: str) -> str:
        return f"the request body is {size}; this server takes at most {self.max_bytes} (VAE_MAX_BODY_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if (
            scope["method"] in _NO_BODY
            and (declared or _has_header(scope, b"transfer-encoding"))
            and self._answers_get(scope)
            and (declared or await self._chunked_body(scope, receive))
        ):
            detail = (
                f"{scope['method']} {quoted(scope['path'])} takes no request body; "
                "options go in the query string (?name=value)"
            )
            await refuse(scope, receive, send, status.HTTP_400_BAD_REQUEST, detail, CLOSE)
            return
        if declared is not None and declared > self.max_bytes:
            detail = self._detail(f"{declared} bytes")
            await refuse(scope, receive, send, status.HTTP_413_CONTENT_TOO_LARGE, detail, CLOSE)
            return
        received = 0
        deadline: float | None = None  # set by the first read of the body
        complete = False

        async def counted() -> Message:
            nonlocal received, deadline, complete
            if complete:  # the body is in; what follows is a wait for the client's disconnect
                return await receive()
            if deadline is None:
                _refuse_encoded(scope)
                deadline = asyncio.get_running_loop().time() + self.timeout
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    status.HTTP_408_REQUEST_TIMEOUT,
                    detail=f"the request body did not arrive within {self.timeout:g} seconds "
                    "(VAE_BODY_TIMEOUT)",
                    headers=CLOSE,
                ) from None
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route that reads the body: FastAPI answers it as JSON.
                    raise HTTPException(
                        status.HTTP_413_CONTENT_TOO_LARGE,
                        self._detail(f"more than {self.max_bytes} bytes"),
                        headers=CLOSE,
                    )
            return message

        await self.app(scope, counted, send)

    def _answers_get(self, scope: Scope) -> bool:
        """Whether a route answers this GET or HEAD: a body sent to a POST route or an unknown path is the
        app's 405 or 404 to give, which says what is wrong with the request."""
        return any(route.matches(scope)[0] is Match.FULL for route in self.router.routes)

    async def _chunked_body(self, scope: Scope, receive: Receive) -> bool:
        """Whether a GET sent chunked has a body. Some clients send an empty one so (the last chunk and
        nothing before it): that one is let through; one with bytes in it, or whose last chunk has not come
        within the body timeout, is a body."""
        try:
            async with asyncio.timeout(self.timeout):
                message = await receive()
        except TimeoutError:
            return True
        return message["type"] == "http.request" and bool(message.get("body") or message.get("more_body"))


def _refuse_encoded(scope: Scope) -> None:
    """415 (raised inside the route reading the body) for a Content-Encoding other than identity."""
    values = [value.decode("latin-1") for name, value in scope["headers"] if name == b"content-encoding"]
    codings = [coding.strip().lower() for value in values for coding in value.split(",")]
    if any(coding not in ("", "identity") for coding in codings):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"Content-Encoding {quoted(', '.join(values))} is not supported; send the body "
            "uncompressed (this server takes only identity bodies)",
        )


def _has_header(scope: Scope, header: bytes) -> bool:
    return any(name == header for name, _ in scope["headers"])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class CORS(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered as JSON naming what was refused, like every other
    error (Starlette answers `Disallowed CORS method` in plain text)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            await super().__call__(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if "origin" not in headers or "access-control-request-method" not in headers:
            await super().__call__(scope, receive, send)
            return
        response = self.preflight_response(request_headers=headers)
        if response.status_code == status.HTTP_200_OK:
            await response(scope, receive, send)
            return
        refusal = {
            name: value
            for name, value in response.headers.items()
            if name.startswith("access-control-") or name == "vary"
        }
        detail = "CORS preflight refused: " + "; ".join(self._refused(headers))
        await refuse(scope, receive, send, status.HTTP_400_BAD_REQUEST, detail, refusal)

    def _refused(self, headers: Headers) -> list[str]:
        """What of the preflight `headers` is not allowed, each with what is."""
        refused = []
        if not self.is_allowed_origin(origin=headers["origin"]):
            refused.append(f"origin {quoted(headers['origin'])} is not one of VAE_CORS_ORIGINS")
        method = headers["access-control-request-method"]
        if method not in self.allow_methods:
            refused.append(f"method {quoted(method)} is not allowed ({', '.join(self.allow_methods)})")
        listed = headers.get("access-control-request-headers")
        requested = [name.strip() for name in listed.split(",")] if listed is not None else []
        extra = [name for name in requested if name and name.lower() not in self.allow_headers]
        if extra:
            allowed = ", ".join(_CORS_HEADERS)
            refused.append(
                f"headers {quoted(', '.join(extra))} are not allowed (those safelisted and {allowed})"
            )
        if "" in requested:
            refused.append("Access-Control-Request-Headers has an empty name (a stray comma)")
        if "access-control-request-private-network" in headers:
            refused.append("private network access is not allowed")
        return refused


class InFlightLimit:
    """At most `limit` requests handled at once (probes aside); the next ones get 503 at once."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_probe(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            detail = (
                f"the server is handling {self.limit} requests, its limit (VAE_MAX_IN_FLIGHT); "
                f"retry in {RETRY_AFTER_S} s"
            )
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            await refuse(scope, receive, send, status.HTTP_503_SERVICE_UNAVAILABLE, detail, headers)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class APIKeys:
    """Requests outside `open_paths` and the playground page need one of `keys`: 401 without a key, 403 with
    another one.

    Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every key: the time taken
    tells nothing about the key sent, not even its length.
    """

    def __init__(self, app: ASGIApp, keys: list[SecretStr]) -> None:
        self.app = app
        self._digests = [_digest(key.get_secret_value().encode()) for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The API docs describe the API, nothing of its data: they load without a key, and their Authorize
        # button takes one for the requests they send.
        # An open path with a trailing slash too: the app answers it with a 307 to the path without.
        if scope["type"] != "http" or _open_to_all(scope["path"].rstrip("/") or "/"):
            await self.app(scope, receive, send)
            return
        presented, malformed = _presented_keys(scope)
        if not presented:
            detail = "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            headers = {"WWW-Authenticate": "Bearer", **_close_if_body(scope)}
            await refuse(scope, receive, send, status.HTTP_401_UNAUTHORIZED, detail, headers)
            return
        # Every key sent must be valid: with two headers that disagree, neither is taken over the other, and
        # a malformed Authorization header beside a key is a credential sent, not one to pass over.
        accepted = not malformed
        for key in presented:
            digest, known_key = _digest(key), False
            for known in self._digests:
                known_key |= hmac.compare_digest(digest, known)
            accepted &= known_key
        if not accepted:
            if malformed:
                detail = "an API key sent is not valid: the Authorization header is not 'Bearer <key>'"
            else:
                detail = "the API key is not valid" if len(presented) == 1 else "an API key sent is not valid"
            await refuse(scope, receive, send, status.HTTP_403_FORBIDDEN, detail, _close_if_body(scope))
            return
        await self.app(scope, receive, send)


def _close_if_body(scope: Scope) -> dict[str, str]:
    """CLOSE for a refused request that has a body: its body is never read, and the connection is closed
    rather than left for the server to read the body to its end and discard it, for as long and as much as
    a client without a key sends (the body's limits apply only to requests let in)."""
    return CLOSE if _content_length(scope) or _has_header(scope, b"transfer-encoding") else {}


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _open_to_all(path: str) -> bool:
    return is_probe(path) or is_page_path(path) or is_docs_path(path)


def _presented_keys(scope: Scope) -> tuple[list[bytes], bool]:
    """The keys of the request's `Authorization: Bearer <key>` and `X-API-Key: <key>` headers, and whether
    an Authorization header holds something else (another scheme, or no key)."""
    keys, malformed = [], False
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                keys.append(token.strip())
            else:
                malformed = True
        elif name == b"x-api-key" and value.strip():
            keys.append(value.strip())
    return keys, malformed


def install(app: FastAPI, settings: Settings) -> None:
    """Add the guards to `app` (outermost first: CORS, API keys, in-flight bound, body size) and document
    what they answer in its OpenAPI schema."""
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout, router=app.router
    )
    app.add_middleware(InFlightLimit, limit=settings.max_in_flight)
    if settings.api_keys:
        app.add_middleware(APIKeys, keys=settings.api_keys)
    if settings.cors_origins:
        app.add_middleware(CORS, **_cors_options(settings))
    edit_on_build(app, partial(_document_refusals, keys=bool(settings.api_keys)))


def cors_headers(settings: Settings) -> CORS | None:
    """The CORS headers of `settings` for an answer sent outside the CORS middleware (`CORS.send` adds them
    to a response's start), or None without VAE_CORS_ORIGINS."""
    if not settings.cors_origins:
        return None
    return CORS(_no_app, **_cors_options(settings))


def _cors_options(settings: Settings) -> dict[str, Any]:
    return {
        "allow_origins": settings.cors_origins,
        "allow_methods": ["GET", "HEAD", "POST"],
        "allow_headers": _CORS_HEADERS,
        "expose_headers": [request_id.HEADER, "Retry-After", HEADER_LENGTH],
    }


def cors_send(cors: CORS | None, scope: Scope, send: Send) -> Send:
    """`send`, with `cors`'s headers (from `cors_headers`) added to the response's start, for an answer sent
    outside the CORS middleware; `send` itself without VAE_CORS_ORIGINS."""
    if cors is None:
        return send
    return partial(cors.send, send=send, request_headers=Headers(scope=scope))


async def _no_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("cors_headers() decorates answers; it serves none")


# The refusals above as OpenAPI responses: status -> description.
_BODY_REFUSALS = {
    "408": "The body did not all arrive within VAE_BODY_TIMEOUT seconds.",
    "413": "The body is larger than VAE_MAX_BODY_BYTES, an image has more pixels than VAE_MAX_IMAGE_PIXELS, "
    "or the images together more than VAE_MAX_REQUEST_PIXELS (the detail names it).",
    "415": "The body's content type is not one the endpoint reads, or it is compressed (Content-Encoding).",
}
_GET_BODY = {
    "400": "The request came with a body: this endpoint reads none (options go in the query string)."
}
_BUSY = {
    "503": "The model is not loaded yet, VAE_MAX_IN_FLIGHT requests are in flight, or the server stopped "
    "before answering (it was shutting down): send it again after Retry-After."
}
_UNAUTHORISED = {
    "401": "No API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
    "403": "The API key is not valid.",
}
_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def _validation_error(response: dict[str, Any] | None) -> bool:
    """Whether `response` is the 422 FastAPI documents by itself (FastAPI's HTTPValidationError)."""
    content = (response or {}).get("content", {}).get("application/json", {})
    return str(content.get("schema", {}).get("$ref", "")).endswith("/HTTPValidationError")


def _document_refusals(schema: dict[str, Any], *, keys: bool) -> None:
    """Add the guards' answers to every operation of the OpenAPI `schema` they apply to."""
    components = schema.setdefault("components", {})
    for model in (ErrorResponse, ProtocolError):
        components.setdefault("schemas", {}).setdefault(model.__name__, model.model_json_schema())
    if keys:
        components["securitySchemes"] = _SECURITY_SCHEMES
    for path, operations in schema.get("paths", {}).items():
        shape = ProtocolError if is_protocol_path(path) else ErrorResponse
        error = {"application/json": {"schema": {"$ref": f"#/components/schemas/{shape.__name__}"}}}
        for method, operation in operations.items():
            refusals = dict(_BODY_REFUSALS) if "requestBody" in operation else {}
            if method in ("get", "head"):
                refusals |= _GET_BODY
            if path not in _OPEN_TEMPLATES:
                refusals |= _BUSY | (_UNAUTHORISED if keys else {})
                if keys:
                    operation["security"] = [{name: []} for name in _SECURITY_SCHEMES]
            responses = operation.setdefault("responses", {})
            if "requestBody" not in operation and _validation_error(responses.get("422")):
                # FastAPI's own 422 for a route with a path parameter: a string path parameter and no
                # body cannot fail validation (an unknown /v2 model name is a 404).
                del responses["422"]
            for code, description in refusals.items():
                response = responses.setdefault(code, {"description": description, "content": error})
                if code == "503":  # it says what the route's own 503 says (not loaded yet), and more
                    response["description"] = description
