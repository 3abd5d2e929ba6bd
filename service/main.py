"""The app factory: `create_app(settings)` builds the FastAPI app; its lifespan loads and checks the model.

VAE_MODEL_DIR=models/default uvicorn --factory service.main:create_app
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypedDict
from urllib.parse import unquote

from fastapi import FastAPI, Request, Response, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from service import request_id
from service.api import guards, openapi
from service.api.docs import create_fastapi
from service.api.middleware import RequestMiddleware
from service.api.responses import NumpyJSONResponse
from service.api.routes import ROUTERS
from service.api.routes.v2 import error_key, is_protocol_path, protocol_error
from service.config import Settings, get_settings, misspelt_settings
from service.logs import configure_logging
from service.metrics import Metrics
from service.runtime import Model, ModelError, load_model

__all__ = ["CLIENT_CLOSED_REQUEST", "MAX_ERRORS", "State", "create_app"]

log = logging.getLogger(__name__)

# The cyclic collector's first threshold: allocations (net of frees) of tracked objects between two young
# collections. Python's 700 is crossed whenever a few dozen requests wait at once (each holds its coroutines,
# scope and request objects while its model run is on the batching thread), and each crossing traverses them
# all, about 7 us a request at 16 connections. Objects freed by reference counting never count, and the
# request paths, refusals included, leave no reference cycles behind: a larger threshold only lets the rare
# cycle wait longer for its collection.
_YOUNG_COLLECTION_THRESHOLD = 20_000
# Most errors a 422 lists, in the order found; one more entry counts the rest. A body can hold thousands of
# wrong values, each its own error (bodies of far more values are refused before validation, in
# `service.api.bodies`), and a list of them all helps no one: the first ones show what is wrong.
MAX_ERRORS = 20
# nginx's status for a request whose client closed the connection before it was answered: what the access
# log and the metrics record for it, rather than a 500 (nothing failed here, and no one reads the answer).
CLIENT_CLOSED_REQUEST = 499


class State(TypedDict):
    """The lifespan state every request sees as `request.state`."""

    settings: Settings
    model: Model
    metrics: Metrics


class _InternalError(NumpyJSONResponse):
    """An unexpected failure still answers JSON with a `detail` (`error` under /v2) and the request id to
    find it in the log. Starlette's outermost middleware sends it, outside the CORS middleware: it adds the
    CORS headers itself, so that a page on an allowed origin reads it instead of a network error."""

    def __init__(self, request: Request, cors: guards.CORS | None) -> None:
        rid = request_id.current() or request_id.generate()
        super().__init__(
            {error_key(request.url.path): "internal server error", "request_id": rid},
            status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
            headers={request_id.HEADER: rid},
        )
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, guards.cors_send(self.cors, scope, send))


async def _client_gone(request: Request, error: Exception) -> Response:
    """The client went away while its body was being read (or sent a body the server could not frame)."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _http_error(request: Request, error: Exception) -> Response:
    """FastAPI's `{"detail": ...}`, or under /v2 the protocol's `{"error": ...}` (unknown paths included)."""
    assert isinstance(error, HTTPException)
    if error.status_code == status.HTTP_404_NOT_FOUND:
        moved = _without_trailing_slash(request)
        if moved is not None:
            return RedirectResponse(moved, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    if is_protocol_path(request.url.path):
        return protocol_error(error.status_code, str(error.detail), error.headers)
    return await http_exception_handler(request, error)


def _without_trailing_slash(request: Request) -> str | None:
    """`/sample?n=2` for `/sample/?n=2`, when the path without its trailing slashes is a route: where a 307
    sends the client (the method and body go with it). Relative, unlike Starlette's own redirect (replaced
    here), which wrote an absolute URL from the Host header and the scheme uvicorn saw: behind a proxy that
    terminates TLS it sent https clients to http, and it echoed any Host a client sent."""
    path: str = request.scope["path"]
    stripped = path.rstrip("/")
    if not stripped or stripped == path:
        return None
    # The slashes as sent: an encoded one (`/sample%2F`) is part of the name, and stripping the decoded path
    # while the Location kept `%2F` sent the client back to the same URL for ever.
    raw: bytes = request.scope.get("raw_path") or path.encode()
    if unquote(raw.rstrip(b"/").decode("latin-1")) != stripped:
        return None
    # A 404 from inside a mount (the docs' files: it extends root_path on the way in) is the mount's own.
    root = request.scope.get("root_path", "")
    if root != request.scope.get("app_root_path", root):
        return None
    scope = {**request.scope, "path": stripped}
    if all(route.matches(scope)[0] == Match.NONE for route in request.app.router.routes):
        return None
    query: bytes = request.scope["query_string"]
    return (raw.rstrip(b"/") + (b"?" + query if query else b"")).decode("latin-1")


async def _invalid_request(request: Request, error: Exception) -> Response:
    """422 as a list of `{"type", "loc", "msg"}`: FastAPI's own, less the input it would echo back; at most
    `MAX_ERRORS` of them, then one `too_many_errors` entry that says how many more there are."""
    assert isinstance(error, RequestValidationError)
    fields = ("type", "loc", "msg")
    entries = error.errors()
    listed: list[dict[str, Any]] = [{key: entry[key] for key in fields} for entry in entries[:MAX_ERRORS]]
    rest = entries[MAX_ERRORS:]
    if rest:
        more = f"{len(rest)} more error{'s' if len(rest) > 1 else ''}"
        listed.append(
            {
                "type": "too_many_errors",
                "loc": _shared_loc([entry["loc"] for entry in rest]),
                "msg": f"and {more}, not listed: a 422 lists the first {MAX_ERRORS}",
            }
        )
    return NumpyJSONResponse({"detail": listed}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _shared_loc(locs: list[tuple[str | int, ...]]) -> list[str | int]:
    """The longest start that every loc has (`["body", "latents"]`): where the errors left out are."""
    shared = list(locs[0])
    for loc in locs[1:]:
        same = 0
        while same < min(len(shared), len(loc)) and shared[same] == loc[same]:
            same += 1
        del shared[same:]
    return shared


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service; `settings` default to the environment (`VAE_*`)."""
    settings = settings or get_settings()
    configure_logging()
    for variable, setting in misspelt_settings(os.environ):
        log.warning("%s is not a setting, and is ignored: did you mean %s?", variable, setting)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        try:
            model = load_model(settings, observer=metrics.observe_run)
        except ModelError as error:
            # One line that says what is wrong, before uvicorn logs the traceback of the same failure.
            log.error("cannot serve the model: %s", error)
            raise
        metrics.describe(model)
        openapi.describe_model(app, model.latent_dim)
        # What startup built (modules, routes, schemas, the model) lives as long as the process: frozen out
        # of the cyclic collector's full passes, which otherwise stall requests for tens of milliseconds.
        gc.freeze()
        gc.set_threshold(_YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
        try:
            yield {"settings": settings, "model": model, "metrics": metrics}
        finally:
            model.close(settings.stall_timeout)  # stops the batching threads

    app = create_fastapi(
        title="VAE service",
        summary="Encode images into a VAE's latent space, decode and sample from it, on ONNX Runtime.",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,  # `_without_trailing_slash` answers them, with a relative Location
    )
    for router in ROUTERS:
        app.include_router(router)
    cors = guards.cors_headers(settings)

    async def internal_error(request: Request, error: Exception) -> Response:
        return _InternalError(request, cors)

    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    guards.install(app, settings)  # CORS, API keys, in-flight bound, body size
    openapi.install(app, settings)  # the settings' bounds and the model's latent_dim in the schema
    # Added last, so it is the outermost middleware: it times and counts what the others answer too.
    # The routers' own routes: FastAPI wraps included ones in a router-level route that has no template.
    routes = [*app.router.routes, *(route for router in ROUTERS for route in router.routes)]
    app.add_middleware(
        RequestMiddleware,
        metrics=metrics,
        routes=routes,
        log_requests=settings.access_log,
        cors=cors,
    )
    return app
