"""In-process cost of answering `/sample?n=16` with pixel lists the ways FastAPI tutorials do.

    .venv/bin/python bench/serialisation.py

For the naive peer's figures in `make bench`: the same 16 images (and their latents) as float lists through
FastAPI's `jsonable_encoder` and the standard library's JSON (a handler that returns a dict), and through a
Pydantic response model (validated, dumped, then the same JSON: what `bench/peers/naive.py` does), at this
model's 8x8 and at MNIST's 28x28; and the service's own way, orjson straight from the numpy array. The
median of repeated runs, in microseconds; nothing is served.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel

# Images per response, as /sample's default n, and the latents drawn for them.
N, LATENT_DIM = 16, 16
REPEATS = 50


class SampleOut(BaseModel):
    latents: list[list[float]]
    images: list[list[list[list[float]]]]


def median_us(render: Callable[[], Any]) -> float:
    render()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        render()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def ways(latents: np.ndarray, images: np.ndarray) -> dict[str, Callable[[], Any]]:
    """Each way of rendering one response of `latents` and `images`."""
    as_lists = {"latents": latents.tolist(), "images": images.tolist()}
    return {
        "jsonable_encoder + json.dumps (a dict returned)": lambda: json.dumps(jsonable_encoder(as_lists)),
        "Pydantic response model + json.dumps": lambda: json.dumps(
            SampleOut.model_validate(SampleOut(**as_lists).model_dump()).model_dump(mode="json")
        ),
        "orjson from numpy (the service)": lambda: orjson.dumps(
            {"latents": latents, "images": images}, option=orjson.OPT_SERIALIZE_NUMPY
        ),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((N, LATENT_DIM)).astype(np.float32)
    print(
        f"{N} images and their latents, median of {REPEATS} runs "
        f"({platform.machine()}, {os.cpu_count()} CPUs)"
    )
    for side in (8, 28):
        images = rng.uniform(size=(N, 1, side, side)).astype(np.float32)
        for way, render in ways(latents, images).items():
            print(f"  {side}x{side}: {way:50s} {median_us(render):8.0f} us")


if __name__ == "__main__":
    main()
