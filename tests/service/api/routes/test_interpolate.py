"""POST /interpolate: between two latents (JSON) or the posterior means of two images (multipart)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.model_card import ModelCard
from service.schemas import DecodeResponse, EncodeResponse, InterpolateResponse
from tests.service.conftest import LIMITS
from tests.service.helpers import body, decoded_png, detail, digit_png, files, messages, png


def ends(d: int) -> list[list[float]]:
    return np.random.default_rng(0).standard_normal((2, d)).tolist()


@pytest.mark.parametrize("method", ["lerp", "slerp"])
def test_path_runs_from_start_to_end(client: TestClient, card: ModelCard, method: str) -> None:
    start, end = ends(card.latent_dim)
    response = client.post(f"/interpolate?steps=5&method={method}", json={"latents": [start, end]})
    result = body(response, InterpolateResponse)
    path = np.asarray(result.latents)
    assert path.shape == (5, card.latent_dim)
    assert len(result.images) == 5
    # The path is returned (and decoded) as float32.
    np.testing.assert_allclose(path[0], start, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(path[-1], end, rtol=1e-6, atol=1e-7)


def test_lerp_is_a_straight_line(client: TestClient, card: ModelCard) -> None:
    start, end = ends(card.latent_dim)
    result = body(
        client.post("/interpolate?steps=3&method=lerp", json={"latents": [start, end]}), InterpolateResponse
    )
    np.testing.assert_allclose(result.latents[1], (np.asarray(start) + end) / 2, rtol=1e-6, atol=1e-7)


def test_slerp_is_the_default_and_keeps_the_radius(client: TestClient, card: ModelCard) -> None:
    start, end = ends(card.latent_dim)
    end = (np.asarray(end) * np.linalg.norm(start) / np.linalg.norm(end)).tolist()  # same norm at both ends
    result = body(client.post("/interpolate?steps=7", json={"latents": [start, end]}), InterpolateResponse)
    np.testing.assert_allclose(np.linalg.norm(result.latents, axis=1), np.linalg.norm(start), rtol=1e-5)


def test_images_are_the_decoded_path(client: TestClient, card: ModelCard) -> None:
    result = body(
        client.post("/interpolate?steps=4&format=array", json={"latents": ends(card.latent_dim)}),
        InterpolateResponse,
    )
    decoded = body(client.post("/decode?format=array", json={"latents": result.latents}), DecodeResponse)
    assert result.images == decoded.images


def test_between_two_images_uses_their_means(client: TestClient) -> None:
    images = files(digit_png(0), digit_png(1))
    result = body(client.post("/interpolate?steps=3", files=images), InterpolateResponse)
    encoded = body(client.post("/encode", files=images), EncodeResponse)
    np.testing.assert_allclose(result.latents[0], encoded.mu[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.latents[-1], encoded.mu[1], rtol=1e-6, atol=1e-7)


def test_invert_reads_dark_on_light_images(client: TestClient) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, size=(2, 8, 8), dtype=np.uint8)
    plain = body(client.post("/interpolate?steps=3", files=files(*map(png, pixels))), InterpolateResponse)
    dark = files(*(png(255 - p) for p in pixels))
    inverted = body(client.post("/interpolate?steps=3&invert=true", files=dark), InterpolateResponse)
    as_sent = body(client.post("/interpolate?steps=3", files=dark), InterpolateResponse)
    assert not np.allclose(as_sent.latents, plain.latents)
    # 1 - (1 - x) in float32 can differ from x by one ulp.
    np.testing.assert_allclose(inverted.latents, plain.latents, rtol=1e-5, atol=1e-6)


def test_grid(client: TestClient, card: ModelCard) -> None:
    _, h, w = card.input_shape
    response = client.post("/interpolate?steps=4&format=grid", json={"latents": ends(card.latent_dim)})
    assert response.headers["content-type"] == "image/png"
    assert decoded_png(response.content).shape[:2] == (2 * h + 1, 2 * w + 1)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("steps=1", (("query", "steps"), "Input should be greater than or equal to 2")),
        ("steps=5", (("query", "steps"), "steps is 5; this server allows at most 4 (VAE_MAX_STEPS)")),
        ("steps=2&method=cubic", (("query", "method"), "Input should be 'lerp' or 'slerp'")),
    ],
    ids=["one-step", "too-many-steps", "unknown-method"],
)
def test_bad_options_are_422(
    limited: TestClient, card: ModelCard, query: str, expected: tuple[tuple[object, ...], str]
) -> None:
    assert LIMITS["max_steps"] == 4
    assert messages(limited.post(f"/interpolate?{query}", json={"latents": ends(card.latent_dim)})) == [
        expected
    ]


def test_exactly_two_latents(client: TestClient, card: ModelCard) -> None:
    d = card.latent_dim
    [(loc, message)] = messages(client.post("/interpolate", json={"latents": [[0.0] * d] * 3}))
    assert loc == ("body", "latents")
    assert message == "List should have at most 2 items after validation, not 3"


def test_wrong_length_names_the_vector(client: TestClient, card: ModelCard) -> None:
    d = card.latent_dim
    response = client.post("/interpolate", json={"latents": [[0.0] * d, [0.0] * (d + 3)]})
    assert messages(response) == [
        (("body", "latents", 1), f"latent 1 has {d + 3} values; this model takes {d}")
    ]


def test_exactly_two_images(client: TestClient) -> None:
    response = client.post("/interpolate", files=files(digit_png(0)))
    assert messages(response) == [(("body", "files"), "1 images sent; interpolation takes exactly 2")]


def test_unreadable_image_is_400(client: TestClient) -> None:
    response = client.post("/interpolate", files=files(digit_png(0), b"\x89PNG broken"))
    assert detail(response, 400) == "file 1 ('image1.png') is not an image format Pillow can read"


def test_text_is_415(client: TestClient) -> None:
    response = client.post("/interpolate", content=b"0,1", headers={"content-type": "text/csv"})
    assert detail(response, 415).startswith("content type 'text/csv' is not supported here")
