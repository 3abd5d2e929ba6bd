"""The request middleware: request id, metrics and access log for every HTTP request.

A plain ASGI middleware (no BaseHTTPMiddleware: that one runs the app in a second task and copies the body
stream), so that what it adds to a request is a few microseconds. Requests are labelled by the template of
the route that answered them (`/v2/models/{model_name}/infer`), never by the raw path.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from time import perf_counter

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import request_id
from service.api.guards import CLOSE, CORS, RETRY_AFTER_S, cors_send, refuse
from service.logs import access_log
from service.metrics import Metrics

__all__ = ["STOPPING", "RequestMiddleware"]

_HEADER = request_id.HEADER.lower().encode("ascii")
# The route label of requests that no route matched (404s): their paths are whatever clients send.
UNMATCHED = "unmatched"
# Set by `python -m service` when the server begins to stop (SIGTERM, Ctrl-C). From then on, a request
# cancelled before it was answered was cut off by the end of the drain; any other cancellation (a timeout
# around the app, a server that cancels on disconnect) goes on as a cancellation.
STOPPING = threading.Event()


def _with_head(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """A 405's Allow header names HEAD wherever it names GET: HEAD is answered as GET."""
    if name.lower() == b"allow":
        methods = [method.strip() for method in value.split(b",")]
        if b"GET" in methods and b"HEAD" not in methods:
            value = b", ".join([*methods, b"HEAD"])
    return name, value


class RequestMiddleware:
    """Takes or makes the request id (and returns it), counts and times the request, logs it."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        routes: Sequence[BaseRoute],
        log_requests: bool = True,
        cors: CORS | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        # The CORS headers for what this middleware answers itself, outside the CORS middleware.
        self.cors = cors
        # Those with a template, to name a request that a guard refused before routing could.
        self.routes = [route for route in routes if isinstance(getattr(route, "path", None), str)]
        self.log_requests = log_requests

    def _route(self, scope: Scope, root_path: str) -> str:
        """The template of the route that answered, or would have: a guard refuses before routing. A mount
        (the docs' files) answers as its path."""
        route = scope.get("route")
        if route is not None:
            return str(route.path)
        routed = {**scope, "root_path": root_path}  # as it came in: a mount extends it on the way down
        for candidate in self.routes:  # only for refusals, 404s and mounts: a few microseconds each
            match, _ = candidate.matches(routed)
            if match != Match.NONE:
                return str(getattr(candidate, "path", UNMATCHED))
        return UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        method = scope["method"]
        # HEAD is GET without the body (RFC 9110, 9.3.2): routed as GET, the body left unsent. The server
        # knows the request was HEAD too (uvicorn sends no body for it); this covers any other.
        head = method == "HEAD"
        app_scope = {**scope, "method": "GET"} if head else scope
        root_path = scope.get("root_path", "")
        given = next((value for name, value in scope["headers"] if name == _HEADER), None)
        rid = request_id.accept(given)
        id_header = (_HEADER, rid.encode("ascii"))
        # An exception before the response starts becomes a 500 (sent by Starlette's outermost middleware).
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = list(message.get("headers", ()))
                if not any(name.lower() == _HEADER for name, _ in headers):
                    headers.append(id_header)
                if status == 405:
                    headers = [_with_head(name, value) for name, value in headers]
                message["headers"] = headers
            elif head and message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(app_scope, receive, send_with_id)
        except asyncio.CancelledError:
            if started or not STOPPING.is_set():  # once started, nothing better to send than the end
                raise
            # uvicorn cancels the requests still running when the drain after SIGTERM ends (VAE_DRAIN_TIMEOUT,
            # or a second Ctrl-C). Left to it, each would be a plain-text 500 and a traceback in the log.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            # It was not served: it may be sent again, to another replica or once this one is back.
            detail = "the server stopped before this request was answered; send it again"
            headers = {"Retry-After": str(RETRY_AFTER_S), **CLOSE}
            # A page on another origin reads it (and its Retry-After) too.
            reply = cors_send(self.cors, scope, send_with_id)
            await refuse(scope, receive, reply, 503, detail, headers)
        finally:
            seconds = perf_counter() - start
            self.metrics.in_flight.dec()
            route = self._route(app_scope, root_path)
            self.metrics.observe_request(method, route, status, seconds)
            if self.log_requests:
                access_log.info(
                    "%s %s %d",
                    method,
                    scope["path"],
                    status,
                    extra={
                        "request_id": rid,
                        "method": method,
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(seconds * 1000.0, 3),
                        "client": scope["client"][0] if scope.get("client") else None,
                    },
                )
