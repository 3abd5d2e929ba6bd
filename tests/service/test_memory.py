"""Requests leave no reference cycles behind: what a request held is freed as soon as it ends.

The app raises the cyclic collector's first threshold (`service.main`) on the strength of this; garbage in
cycles would wait for that many allocations before it is freed.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import httpx2
import orjson
from fastapi import FastAPI

from service.config import Settings
from service.main import create_app
from tests.service.helpers import digit_png, files

Message = dict[str, Any]


async def _request(
    app: FastAPI, state: Any, method: str, target: str, body: bytes = b"", **headers: str
) -> int:
    """One request straight through the ASGI app (no client library in between); its status."""
    path, _, query = target.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"test"), (b"content-length", str(len(body)).encode())]
        + [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": dict(state),
    }
    received = False
    statuses: list[int] = []

    async def receive() -> Message:
        nonlocal received
        if received:
            await asyncio.Event().wait()  # the client neither sends more nor goes away
        received = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


def _upload(*images: bytes) -> tuple[bytes, str]:
    """A multipart body of image files, as the test client would send it, and its content type."""
    request = httpx2.Request("POST", "http://test/encode", files=files(*images))
    return request.read(), request.headers["content-type"]


def test_answered_and_refused_requests_leave_no_reference_cycles(settings: Settings) -> None:
    app = create_app(settings)
    images, images_type = _upload(digit_png(0), digit_png(1))
    bad_image, bad_image_type = _upload(digit_png(0), b"not an image")
    latents = orjson.dumps({"latents": [[0.0] * 3]})  # the wrong length: a 422

    async def every_kind(state: Any) -> list[int]:
        one = [
            _request(app, state, "GET", "/sample?n=4&format=array"),
            _request(app, state, "GET", "/sample?n=4&format=png"),
            _request(app, state, "GET", "/sample?n=0"),
            _request(app, state, "POST", "/encode", images, content_type=images_type),
            _request(app, state, "POST", "/encode", bad_image, content_type=bad_image_type),
            _request(app, state, "POST", "/decode", latents, content_type="application/json"),
            _request(app, state, "GET", "/nowhere"),
        ]
        # All at once, eight more /sample among them, so that model runs are coalesced on the batching
        # threads.
        return list(
            await asyncio.gather(*one, *[_request(app, state, "GET", "/sample?n=2") for _ in range(8)])
        )

    async def unreachable_after_requests() -> tuple[list[int], int]:
        async with app.router.lifespan_context(app) as state:
            await every_kind(state)  # first uses fill caches and metric series, which are not garbage
            gc.collect()
            gc.disable()
            try:
                statuses = await every_kind(state)
                return statuses, gc.collect()
            finally:
                gc.enable()

    statuses, unreachable = asyncio.run(unreachable_after_requests())
    assert statuses[:7] == [200, 200, 422, 200, 400, 422, 404]
    assert statuses[7:] == [200] * 8
    assert unreachable == 0
