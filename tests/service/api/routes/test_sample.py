"""GET /sample: prior draws, decoded, reproducible by seed."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.model_card import ModelCard
from service.schemas import DecodeResponse, SampleResponse
from tests.service.conftest import LIMITS
from tests.service.helpers import body, decoded_png, messages


def test_default_is_sixteen_pngs(client: TestClient, card: ModelCard) -> None:
    result = body(client.get("/sample"), SampleResponse)
    assert np.shape(result.latents) == (16, card.latent_dim)
    assert len(result.images) == 16
    assert all(isinstance(image, str) for image in result.images)
    assert decoded_png(result.images[0]).shape[:2] == card.input_shape[1:]


def test_latents_are_seeded_standard_normal_draws(client: TestClient, card: ModelCard) -> None:
    result = body(client.get("/sample?n=5&seed=3&temperature=0.5"), SampleResponse)
    expected = 0.5 * np.random.default_rng(3).standard_normal((5, card.latent_dim))
    np.testing.assert_array_equal(np.asarray(result.latents, dtype=np.float32), expected.astype(np.float32))


def test_images_are_the_decoded_latents(client: TestClient) -> None:
    sampled = body(client.get("/sample?n=4&seed=1&format=array"), SampleResponse)
    decoded = body(client.post("/decode?format=array", json={"latents": sampled.latents}), DecodeResponse)
    assert sampled.images == decoded.images


@pytest.mark.parametrize("fmt", ["png", "array", "grid"])
def test_same_seed_gives_byte_identical_responses(client: TestClient, fmt: str) -> None:
    first = client.get(f"/sample?n=8&seed=2024&format={fmt}")
    assert first.status_code == 200
    assert client.get(f"/sample?n=8&seed=2024&format={fmt}").content == first.content
    assert client.get(f"/sample?n=8&seed=2025&format={fmt}").content != first.content


def test_zero_temperature_decodes_the_prior_mean(client: TestClient) -> None:
    result = body(client.get("/sample?n=3&temperature=0&format=array"), SampleResponse)
    assert not np.any(result.latents)
    assert result.images[0] == result.images[1] == result.images[2]


def test_grid(client: TestClient, card: ModelCard) -> None:
    _, h, w = card.input_shape
    response = client.get("/sample?n=6&seed=0&format=grid&scale=2")
    assert response.headers["content-type"] == "image/png"
    assert decoded_png(response.content).shape[:2] == (2 * (2 * h + 1), 2 * (3 * w + 2))  # 3 columns, 2 rows


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("n=0", (("query", "n"), "Input should be greater than or equal to 1")),
        (
            f"n={LIMITS['max_latents'] + 1}",
            (("query", "n"), "n is 4; this server allows at most 3 (VAE_MAX_LATENTS)"),
        ),
        ("n=1&temperature=-1", (("query", "temperature"), "Input should be greater than or equal to 0")),
        ("n=1&temperature=nan", (("query", "temperature"), "Input should be a finite number")),
        ("n=1&temperature=inf", (("query", "temperature"), "Input should be a finite number")),
        (
            "n=1&seed=abc",
            (("query", "seed"), "Input should be a valid integer, unable to parse string as an integer"),
        ),
        ("n=1&format=bmp", (("query", "format"), "Input should be 'png', 'array', 'grid' or 'npy'")),
    ],
    ids=[
        "zero",
        "too-many",
        "negative-temperature",
        "nan-temperature",
        "inf-temperature",
        "word-seed",
        "bmp",
    ],
)
def test_bad_options_are_422(
    limited: TestClient, query: str, expected: tuple[tuple[object, ...], str]
) -> None:
    assert messages(limited.get(f"/sample?{query}")) == [expected]
