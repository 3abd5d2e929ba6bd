"""Requests leave no reference cycles behind: what a request held is freed as soon as it ends.

The app raises the cyclic collector's first threshold (`service.main`) on the strength of this; garbage in
cycles would wait for that many allocations before it is freed.
"""

from __future__ import annotations

import asyncio
import gc

import httpx2

from service.config import Settings
from service.main import create_app
from tests.service.helpers import digit_png, files, with_state


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
