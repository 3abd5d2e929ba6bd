"""Building request payloads: PNG bytes of arrays, digits as PNGs, multipart fields; the app as served."""

from __future__ import annotations

import base64
import io
from functools import cache
from typing import Any, TypeVar

import httpx2
import numpy as np
import numpy.typing as npt
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel


def png(pixels: npt.NDArray[np.uint8], mode: str | None = None, **save: object) -> bytes:
    """PNG bytes of a uint8 array ((H, W) or (H, W, C)), converted to `mode` when given."""
    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def digit_png(index: int = 0) -> bytes:
    """One of scikit-learn's digits as an 8-bit greyscale PNG (light on black, like the training data)."""
    return png((digits()[index] / 16.0 * 255.0).round().astype(np.uint8))


@cache
def digits() -> npt.NDArray[np.float64]:
    """scikit-learn's 1797 digits, (N, 8, 8) with values 0..16."""
    from sklearn.datasets import load_digits

    images: npt.NDArray[np.float64] = load_digits().images
    return images


def files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    """A multipart `files` field per image."""
    return [("files", (f"image{i}.png", data, "image/png")) for i, data in enumerate(images)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decoded_png(text_or_bytes: str | bytes) -> npt.NDArray[np.uint8]:
    """The pixels of a PNG given as bytes or base64."""
    data = base64.b64decode(text_or_bytes) if isinstance(text_or_bytes, str) else text_or_bytes
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


M = TypeVar("M", bound=BaseModel)


def body(response: httpx2.Response, model: type[M], status: int = 200) -> M:
    """The response's JSON, checked against its declared model (the routes build JSON without pydantic)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return model.model_validate_json(response.content)


def detail(response: httpx2.Response, status: int) -> Any:
    """The `detail` of an error response, after checking its status and that it is JSON."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["detail"]


def messages(response: httpx2.Response) -> list[tuple[tuple[str | int, ...], str]]:
    """(loc, msg) of each entry of a 422's detail."""
    return [(tuple(entry["loc"]), entry["msg"]) for entry in detail(response, 422)]


def truncated_png() -> bytes:
    """The first half of an incompressible PNG: it opens, but its pixel data ends early."""
    noise = png(np.random.default_rng(0).integers(0, 256, size=(32, 32), dtype=np.uint8))
    return noise[: len(noise) // 2]


def decode_scope() -> dict[str, Any]:
    """The ASGI scope of `POST /decode` with a JSON body of 100 bytes, as a server passes it to the app (for
    tests that feed the body, or its absence, by hand)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/decode",
        "raw_path": b"/decode",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }


def with_state(app: FastAPI, state: Any) -> Any:
    """The app as a server runs it: each request's scope carries a copy of the lifespan state."""

    async def served(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    return served
