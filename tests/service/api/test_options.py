"""Query-string options: validated in one step like FastAPI's parameters, and documented in OpenAPI."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.options import SampleOptions, parse_query
from service.config import Settings
from service.model_card import ModelCard
from service.schemas import SampleResponse
from tests.service.helpers import body, detail, digit_png, files, messages


def test_defaults_and_types(settings: Settings) -> None:
    options = parse_query(SampleOptions, [("n", "3"), ("temperature", "0.5"), ("format", "npy")], settings)
    assert options == SampleOptions(n=3, seed=None, temperature=0.5, format="npy", scale=1)


def test_unknown_and_repeated_parameters_are_refused(client: TestClient) -> None:
    """A misspelt option would otherwise be served its default without a word; a repeated one, which value?"""
    assert messages(client.get("/sample?n=abc&n=2&seed=0&temprature=0&format=array")) == [
        (("query", "temprature"), "unknown option; this endpoint takes n, seed, temperature, format, scale"),
        (("query", "n"), "n is given 2 times; give it once"),
    ]
    assert messages(client.post("/encode?sample=4", files={"files": ("a.png", b"", "image/png")})) == [
        (("query", "sample"), "unknown option; this endpoint takes invert, samples, seed"),
    ]
    assert len(body(client.get("/sample?n=2&seed=0&format=array"), SampleResponse).latents) == 2


def test_options_the_request_cannot_use_are_refused_not_ignored(client: TestClient, card: ModelCard) -> None:
    z = np.zeros((2, card.latent_dim)).tolist()
    png = digit_png(0)
    scale = "scale enlarges PNGs (format=png or grid); format={} returns the pixels unscaled"
    invert = "invert=true flips uploaded images; this JSON body has none (send images)"
    refused = [
        (client.get("/sample?format=array&scale=2"), ("query", "scale"), scale.format("array")),
        (client.get("/sample?format=npy&scale=2"), ("query", "scale"), scale.format("npy")),
        (
            client.post("/decode?format=array&scale=2", json={"latents": z}),
            ("query", "scale"),
            scale.format("array"),
        ),
        (
            client.post("/reconstruct?format=npy&scale=2", files=files(png)),
            ("query", "scale"),
            scale.format("npy"),
        ),
        (
            client.post("/encode?seed=5", files=files(png)),
            ("query", "seed"),
            "seed seeds the z draws, and samples=0 asks for none: add samples=k or drop seed",
        ),
        (client.post("/kl?invert=true", json={"mu": z[0], "logvar": z[0]}), ("query", "invert"), invert),
        (client.post("/interpolate?invert=true", json={"latents": z}), ("query", "invert"), invert),
    ]
    for response, loc, message in refused:
        assert messages(response) == [(loc, message)], response.request.url
    # Where they apply, the same options are served.
    for response in (
        client.get("/sample?format=grid&scale=2"),
        client.get("/sample?format=array&scale=1"),
        client.post("/encode?samples=2&seed=5", files=files(png)),
        client.post("/kl?invert=true", files=files(png)),
        client.post("/interpolate?invert=true", files=files(png, digit_png(1))),
    ):
        assert response.status_code == 200, (response.request.url, response.text)


def test_every_bad_option_is_reported_at_once(limited: TestClient) -> None:
    assert messages(limited.get("/sample?n=9&scale=0&temperature=x")) == [
        (("query", "n"), "n is 9; this server allows at most 3 (VAE_MAX_LATENTS)"),
        (("query", "temperature"), "Input should be a valid number, unable to parse string as a number"),
        (("query", "scale"), "Input should be greater than or equal to 1"),
    ]


def test_options_are_checked_before_the_body_is_read(limited: TestClient) -> None:
    response = limited.post(
        "/encode?samples=9", content=b"not multipart", headers={"content-type": "text/plain"}
    )
    assert detail(response, 422) == [
        {
            "type": "value_error",
            "loc": ["query", "samples"],
            "msg": "samples is 9; this server allows at most 2 (VAE_MAX_SAMPLES)",
        }
    ]


@pytest.mark.parametrize(
    ("path", "method", "names"),
    [
        ("/sample", "get", ["n", "seed", "temperature", "format", "scale"]),
        ("/decode", "post", ["format", "scale"]),
        ("/encode", "post", ["invert", "samples", "seed"]),
        ("/kl", "post", ["invert"]),
        ("/reconstruct", "post", ["invert", "format", "scale", "inputs"]),
        ("/interpolate", "post", ["steps", "method", "format", "scale", "invert"]),
    ],
    ids=["sample", "decode", "encode", "kl", "reconstruct", "interpolate"],
)
def test_openapi_documents_the_options_and_the_422(
    client: TestClient, path: str, method: str, names: list[str]
) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"][path][method]
    documented = {parameter["name"]: parameter for parameter in operation["parameters"]}
    assert list(documented) == names
    assert all(parameter["in"] == "query" and not parameter["required"] for parameter in documented.values())
    assert all(parameter["description"] for parameter in documented.values())
    assert "422" in operation["responses"]
    if "format" in documented:
        assert documented["format"]["schema"]["enum"] == ["png", "array", "grid", "npy"]
        assert set(operation["responses"]["200"]["content"]) == {
            "application/json",
            "image/png",
            "application/x-npy",
        }


def test_npy_is_the_array_as_numpy_reads_it(client: TestClient, card: ModelCard) -> None:
    array = body(client.get("/sample?n=5&seed=4&format=array"), SampleResponse)
    response = client.get("/sample?n=5&seed=4&format=npy")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-npy"
    images = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert images.dtype == np.float32 and images.shape == (5, *card.input_shape)
    np.testing.assert_array_equal(images, np.asarray(array.images, dtype=np.float32))


@pytest.mark.parametrize("route", ["/decode", "/reconstruct", "/interpolate"])
def test_every_route_with_npy_gives_its_images_array(client: TestClient, card: ModelCard, route: str) -> None:
    """`format=npy` is the same (N, C, H, W) float32 images as `format=array`, on each route that has it."""
    if route == "/decode":
        z = np.random.default_rng(5).normal(size=(3, card.latent_dim)).tolist()
        request: dict[str, object] = {"json": {"latents": z}}
    else:
        request = {"files": files(digit_png(1), digit_png(7))}
    array = client.post(f"{route}?format=array", **request)
    response = client.post(f"{route}?format=npy", **request)
    assert response.status_code == array.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-npy"
    images = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert images.dtype == np.float32 and images.shape[1:] == card.input_shape
    np.testing.assert_array_equal(images, np.asarray(array.json()["images"], dtype=np.float32))
