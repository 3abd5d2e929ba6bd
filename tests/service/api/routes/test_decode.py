"""POST /decode: latents -> PNGs, pixel arrays or one grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.model_card import ModelCard
from service.runtime import execution_providers
from service.schemas import DecodeResponse
from tests.service.conftest import LIMITS, PROVIDERS
from tests.service.helpers import body, decoded_png, detail, messages


def latents(n: int, d: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).standard_normal((n, d)).tolist()


def direct_decode(model_dir: Path, card: ModelCard, z: list[list[float]]) -> np.ndarray:
    """The decoder run straight through ONNX Runtime, bypassing the service (on the tests' provider)."""
    path = model_dir / card.decoder.file
    session = ort.InferenceSession(str(path), providers=execution_providers(PROVIDERS))
    (x_mean,) = session.run(["x_mean"], {"z": np.asarray(z, dtype=np.float32)})
    return np.asarray(x_mean)


def test_array_format_is_the_decoder_output(client: TestClient, model_dir: Path, card: ModelCard) -> None:
    z = latents(3, card.latent_dim)
    result = body(client.post("/decode?format=array", json={"latents": z}), DecodeResponse)
    assert np.shape(result.images) == (3, *card.input_shape)
    # orjson writes the shortest repr of each float32, so the values come back exactly.
    np.testing.assert_array_equal(
        np.asarray(result.images, dtype=np.float32), direct_decode(model_dir, card, z)
    )


def test_png_format_is_the_default(client: TestClient, model_dir: Path, card: ModelCard) -> None:
    z = latents(2, card.latent_dim)
    result = body(client.post("/decode", json={"latents": z}), DecodeResponse)
    c, h, w = card.input_shape
    expected = np.round(direct_decode(model_dir, card, z) * 255.0)
    for image, pixels in zip(result.images, expected, strict=True):
        assert isinstance(image, str)
        # 8-bit PNG of the mean: within one level of the exact value (float32 rounding at .5).
        np.testing.assert_allclose(decoded_png(image).reshape(c, h, w), pixels, atol=1)


def test_scale_enlarges_pngs(client: TestClient, card: ModelCard) -> None:
    _, h, w = card.input_shape
    result = body(
        client.post("/decode?scale=2", json={"latents": latents(1, card.latent_dim)}), DecodeResponse
    )
    assert isinstance(result.images[0], str)
    assert decoded_png(result.images[0]).shape[:2] == (2 * h, 2 * w)


def test_grid_is_one_png(client: TestClient, card: ModelCard) -> None:
    _, h, w = card.input_shape
    response = client.post("/decode?format=grid", json={"latents": latents(4, card.latent_dim)})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert decoded_png(response.content).shape[:2] == (2 * h + 1, 2 * w + 1)  # 2 x 2 with a 1-pixel gutter


def test_integers_are_numbers(client: TestClient, card: ModelCard) -> None:
    response = client.post("/decode", json={"latents": [[0] * card.latent_dim]})
    assert len(body(response, DecodeResponse).images) == 1


def test_wrong_length_names_the_vector_and_both_lengths(client: TestClient, card: ModelCard) -> None:
    d = card.latent_dim
    response = client.post(
        "/decode", json={"latents": [[0.0] * d, [0.0] * (d - 1), [0.0] * d, [1.0] * (d + 2)]}
    )
    assert messages(response) == [
        (("body", "latents", 1), f"latent 1 has {d - 1} values; this model takes {d}"),
        (("body", "latents", 3), f"latent 3 has {d + 2} values; this model takes {d}"),
    ]


@pytest.mark.parametrize(
    ("raw", "loc", "expected"),
    [
        (b'{"latents": [[NaN]]}', ("body", "latents", 0, 0), "Input should be a finite number"),
        (b'{"latents": [[Infinity]]}', ("body", "latents", 0, 0), "Input should be a finite number"),
        (b'{"latents": [[-Infinity]]}', ("body", "latents", 0, 0), "Input should be a finite number"),
        (b'{"latents": [["0.5"]]}', ("body", "latents", 0, 0), "Input should be a valid number"),
        (b'{"latents": [[true]]}', ("body", "latents", 0, 0), "Input should be a valid number"),
        (
            b'{"latents": [[1e300]]}',
            ("body", "latents", 0, 0),
            "Input should be less than or equal to 1000000",
        ),
        (
            b'{"latents": [[]]}',
            ("body", "latents", 0),
            "List should have at least 1 item after validation, not 0",
        ),
        (b'{"latents": []}', ("body", "latents"), "List should have at least 1 item after validation, not 0"),
        (b'{"latents": [0.5]}', ("body", "latents", 0), "Input should be a valid array"),
        (b'{"z": [[0.5]]}', ("body", "latents"), "Field required"),
    ],
    ids=[
        "nan",
        "infinity",
        "minus-infinity",
        "string",
        "bool",
        "huge",
        "empty-vector",
        "no-vectors",
        "flat",
        "missing",
    ],
)
def test_bad_latents_are_422(client: TestClient, raw: bytes, loc: tuple[object, ...], expected: str) -> None:
    response = client.post("/decode", content=raw, headers={"content-type": "application/json"})
    assert (loc, expected) in messages(response)


def test_too_many_latents_is_422(limited: TestClient, card: ModelCard) -> None:
    limit = LIMITS["max_latents"]
    response = limited.post("/decode", json={"latents": latents(limit + 1, card.latent_dim)})
    expected = f"{limit + 1} vectors sent; this server takes at most {limit} per request"
    assert messages(response) == [(("body", "latents"), expected)]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("scale=0", (("query", "scale"), "Input should be greater than or equal to 1")),
        ("scale=3", (("query", "scale"), "scale is 3; this server allows at most 2 (VAE_MAX_SCALE)")),
        ("format=jpeg", (("query", "format"), "Input should be 'png', 'array', 'grid' or 'npy'")),
    ],
    ids=["zero-scale", "big-scale", "unknown-format"],
)
def test_bad_options_are_422(
    limited: TestClient, card: ModelCard, query: str, expected: tuple[tuple[object, ...], str]
) -> None:
    assert messages(limited.post(f"/decode?{query}", json={"latents": latents(1, card.latent_dim)})) == [
        expected
    ]


def test_multipart_is_415(client: TestClient) -> None:
    response = client.post("/decode", files={"files": ("a.png", b"x", "image/png")})
    assert (
        detail(response, 415)
        == "content type 'multipart/form-data' is not supported here; send application/json"
    )
