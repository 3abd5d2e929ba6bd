"""HEAD: every GET route answers it as GET does, without the body (RFC 9110, 9.3.2)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from service.api.middleware import RequestMiddleware
from service.metrics import Metrics


@pytest.mark.parametrize(
    "path",
    ["/health", "/ready", "/model", "/metrics", "/", "/v2/health/ready", "/sample?n=2&seed=1&format=grid"],
)
def test_head_is_get_without_the_body(client: TestClient, path: str) -> None:
    got, head = client.get(path), client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    if path.startswith("/sample"):  # the same bytes would come (metrics and the clock change the others)
        assert head.headers["content-length"] == got.headers["content-length"]
    assert head.headers["x-request-id"]


def test_head_is_logged_and_counted_as_head(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="service.access"):
        client.head("/health", headers={"X-Request-ID": "head-1"})
    (record,) = [r for r in caplog.records if getattr(r, "request_id", None) == "head-1"]
    assert (record.method, record.route, record.status) == ("HEAD", "/health", 200)  # type: ignore[attr-defined]
    assert 'method="HEAD",route="/health",status="200"' in client.get("/metrics").text


def test_head_of_a_post_route_is_refused_as_get_is(client: TestClient) -> None:
    head = client.head("/encode")
    assert head.status_code == client.get("/encode").status_code == 405
    assert head.headers["allow"] == "POST"
    # And a GET route's 405 names HEAD beside GET (RFC 9110, 15.5.6).
    assert client.post("/health").headers["allow"] == "GET, HEAD"


def test_the_middleware_itself_leaves_the_body_unsent() -> None:
    """Not only the server (uvicorn, the test client) drops a HEAD response's body: the middleware does."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["method"] == "GET"  # routed as GET
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    middleware = RequestMiddleware(app, Metrics(), routes=[], log_requests=False)
    scope = {"type": "http", "method": "HEAD", "path": "/x", "headers": [], "client": None}
    asyncio.run(middleware(scope, receive, send))
    assert (sent[0]["status"], dict(sent[0]["headers"])[b"content-length"]) == (200, b"5")
    assert sent[1]["body"] == b""
