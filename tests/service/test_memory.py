"""Requests leave no reference cycles behind: what a request held is freed as soon as it ends.

The app raises the cyclic collector's first threshold (`service.main`) on the strength of this; garbage in
cycles would wait for that many allocations before it is freed.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import threading
import tracemalloc
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import httpx2
import numpy as np
import orjson
import pytest

from service.api import bodies
from service.config import Settings
from service.main import create_app
from tests.service.helpers import digit_png, files, with_state

T = TypeVar("T")


def test_answered_and_refused_requests_leave_no_reference_cycles(settings: Settings) -> None:
    app = create_app(settings)

    async def every_kind(client: httpx2.AsyncClient) -> list[int]:
        one = [
            client.get("/sample?n=4&format=array"),
            client.get("/sample?n=4&format=png"),
            client.get("/sample?n=0"),
            client.post("/encode", files=files(digit_png(0), digit_png(1))),
            client.post("/encode", files=files(digit_png(0), b"not an image")),
            client.post("/decode", json={"latents": [[0.0] * 3]}),  # the wrong length
            client.get("/nowhere"),
        ]
        # All at once, eight more /sample among them, so that model runs are coalesced on the batching
        # threads.
        responses = await asyncio.gather(*one, *[client.get("/sample?n=2") for _ in range(8)])
        return [response.status_code for response in responses]

    async def unreachable_after_requests() -> tuple[list[int], int]:
        async with app.router.lifespan_context(app) as state:
            transport = httpx2.ASGITransport(app=with_state(app, state))
            async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
                await every_kind(client)  # first uses fill caches and metric series, which are not garbage
                gc.collect()
                gc.disable()
                try:
                    statuses = await every_kind(client)
                    return statuses, gc.collect()
                finally:
                    gc.enable()

    statuses, unreachable = asyncio.run(unreachable_after_requests())
    assert statuses[:7] == [200, 200, 422, 200, 400, 422, 404]
    assert statuses[7:] == [200] * 8
    assert unreachable == 0


def test_requests_waiting_for_the_decoding_thread_hold_their_bodies_alone(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large JSON body is parsed on the image-decoding thread, in its turn: parsed on arrival, each of the
    requests queued behind a busy thread held its base64 images decoded besides its body (16 MiB bodies
    at VAE_MAX_IN_FLIGHT took a replica past 4 GiB)."""
    queued, busy = threading.Semaphore(0), threading.Event()

    class Counted(ThreadPoolExecutor):
        def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
            future = super().submit(fn, *args, **kwargs)
            queued.release()
            return future

    decoding = Counted(max_workers=1)
    monkeypatch.setattr(bodies, "_DECODING", decoding)
    requests, size = 4, 3 * 2**20
    rng = np.random.default_rng(0)
    payloads = [
        orjson.dumps({"images": [base64.b64encode(rng.bytes(size)).decode()]}) for _ in range(requests)
    ]
    app = create_app(settings)

    async def held_while_queued() -> tuple[int, list[int]]:
        async with app.router.lifespan_context(app) as state:
            transport = httpx2.ASGITransport(app=with_state(app, state))
            async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
                decoding.submit(busy.wait)
                queued.acquire()
                tracemalloc.start()
                try:
                    sent = [
                        asyncio.create_task(
                            client.post("/encode", content=body, headers={"content-type": "application/json"})
                        )
                        for body in payloads
                    ]
                    for _ in range(requests):
                        while not queued.acquire(blocking=False):
                            await asyncio.sleep(0.001)
                    held = tracemalloc.get_traced_memory()[0]
                finally:
                    tracemalloc.stop()
                    busy.set()
                responses = await asyncio.gather(*sent)
                return held, [response.status_code for response in responses]

    held, statuses = asyncio.run(held_while_queued())
    assert statuses == [400] * requests  # random bytes: no image, once the thread reads them
    body = len(payloads[0])
    assert body * requests <= held < body * requests * 1.25, held / (body * requests)
