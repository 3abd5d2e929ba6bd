"""POST /kl: closed-form KL against torch.distributions; from images through the encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch.distributions import Normal, kl_divergence

from service.model_card import ModelCard
from service.schemas import EncodeResponse, KLResponse
from tests.service.conftest import LIMITS
from tests.service.helpers import body, detail, digit_png, files, messages, png


def gaussians(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 2.0, size=(n, d)), rng.uniform(-6.0, 3.0, size=(n, d))


def torch_kl(
    mu: np.ndarray, logvar: np.ndarray, target_mu: np.ndarray, target_logvar: np.ndarray
) -> np.ndarray:
    """Per-dimension KL by torch.distributions in float64: an implementation independent of the service's."""

    def normal(m: np.ndarray, lv: np.ndarray) -> Normal:
        return Normal(torch.from_numpy(m), torch.from_numpy(np.exp(0.5 * lv)))

    return kl_divergence(normal(mu, logvar), normal(target_mu, target_logvar)).numpy()


# The acceptance bound: agreement with the independent computation to 1e-5 relative.
RTOL = 1e-5


def test_one_posterior_against_the_prior(client: TestClient, card: ModelCard) -> None:
    mu, logvar = gaussians(1, card.latent_dim, seed=0)
    result = body(client.post("/kl", json={"mu": mu[0].tolist(), "logvar": logvar[0].tolist()}), KLResponse)
    expected = torch_kl(mu, logvar, np.zeros_like(mu), np.zeros_like(mu))
    np.testing.assert_allclose(result.kl_per_dim, expected, rtol=RTOL)
    np.testing.assert_allclose(result.kl, expected.sum(axis=1), rtol=RTOL)


def test_a_batch_against_the_prior(client: TestClient, card: ModelCard) -> None:
    mu, logvar = gaussians(5, card.latent_dim, seed=1)
    result = body(client.post("/kl", json={"mu": mu.tolist(), "logvar": logvar.tolist()}), KLResponse)
    expected = torch_kl(mu, logvar, np.zeros_like(mu), np.zeros_like(mu))
    assert np.shape(result.kl_per_dim) == (5, card.latent_dim)
    np.testing.assert_allclose(result.kl, expected.sum(axis=1), rtol=RTOL)


def test_against_a_target(client: TestClient, card: ModelCard) -> None:
    mu, logvar = gaussians(3, card.latent_dim, seed=2)
    target_mu, target_logvar = gaussians(1, card.latent_dim, seed=3)
    payload = {
        "mu": mu.tolist(),
        "logvar": logvar.tolist(),
        "target": {"mu": target_mu[0].tolist(), "logvar": target_logvar[0].tolist()},
    }
    result = body(client.post("/kl", json=payload), KLResponse)
    expected = torch_kl(mu, logvar, np.repeat(target_mu, 3, axis=0), np.repeat(target_logvar, 3, axis=0))
    np.testing.assert_allclose(result.kl_per_dim, expected, rtol=RTOL)
    np.testing.assert_allclose(result.kl, expected.sum(axis=1), rtol=RTOL)


def test_standard_normal_target_is_the_prior_form(client: TestClient, card: ModelCard) -> None:
    mu, logvar = gaussians(4, card.latent_dim, seed=4)
    prior = body(client.post("/kl", json={"mu": mu.tolist(), "logvar": logvar.tolist()}), KLResponse)
    standard = {"mu": [0.0] * card.latent_dim, "logvar": [0.0] * card.latent_dim}
    payload = {"mu": mu.tolist(), "logvar": logvar.tolist(), "target": standard}
    general = body(client.post("/kl", json=payload), KLResponse)
    # The two closed forms order their float64 operations differently.
    np.testing.assert_allclose(general.kl_per_dim, prior.kl_per_dim, rtol=1e-12, atol=1e-15)


def test_images_give_the_kl_of_their_posterior(client: TestClient) -> None:
    images = files(digit_png(0), digit_png(9))
    from_images = body(client.post("/kl", files=images), KLResponse)
    encoded = body(client.post("/encode", files=images), EncodeResponse)
    np.testing.assert_allclose(from_images.kl, encoded.kl, rtol=1e-12)
    np.testing.assert_allclose(np.sum(from_images.kl_per_dim, axis=1), from_images.kl, rtol=1e-12)


def test_invert_reads_dark_on_light_images(client: TestClient) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(2, 8, 8), dtype=np.uint8)
    plain = body(client.post("/kl", files=files(*map(png, pixels))), KLResponse)
    dark = files(*(png(255 - p) for p in pixels))
    inverted = body(client.post("/kl?invert=true", files=dark), KLResponse)
    assert not np.allclose(body(client.post("/kl", files=dark), KLResponse).kl, plain.kl)
    # 1 - (1 - x) in float32 can differ from x by one ulp.
    np.testing.assert_allclose(inverted.kl, plain.kl, rtol=1e-5)


def test_unreadable_image_is_400(client: TestClient) -> None:
    response = client.post("/kl", files=files(b""))
    assert detail(response, 400) == "file 0 ('image0.png') is empty (0 bytes)"


def test_text_is_415(client: TestClient) -> None:
    response = client.post(
        "/kl", content=b"mu=1", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert detail(response, 415).startswith(
        "content type 'application/x-www-form-urlencoded' is not supported"
    )


def test_wrong_lengths_name_the_vector_and_both_lengths(client: TestClient, card: ModelCard) -> None:
    d = card.latent_dim
    payload = {"mu": [[0.0] * d, [0.0] * (d + 1)], "logvar": [[0.0] * d, [0.0] * d]}
    assert messages(client.post("/kl", json=payload)) == [
        (("body", "mu", 1), f"mu 1 has {d + 1} values; this model takes {d}")
    ]
    payload = {"mu": [0.0] * d, "logvar": [0.0] * (d - 1)}
    assert messages(client.post("/kl", json=payload)) == [
        (("body", "logvar", 0), f"logvar 0 has {d - 1} values; this model takes {d}")
    ]
    payload = {"mu": [0.0] * d, "logvar": [0.0] * d, "target": {"mu": [0.0] * 2, "logvar": [0.0] * d}}
    assert messages(client.post("/kl", json=payload)) == [
        (("body", "target", "mu", 0), f"target mu 0 has 2 values; this model takes {d}")
    ]


def test_mu_and_logvar_counts_must_match(client: TestClient, card: ModelCard) -> None:
    d = card.latent_dim
    payload = {"mu": [[0.0] * d] * 3, "logvar": [[0.0] * d] * 2}
    assert messages(client.post("/kl", json=payload)) == [
        (("body", "logvar"), "logvar has 2 vectors but mu has 3")
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"mu": [NaN], "logvar": [0]}', [(("body", "mu", 0), "Input should be a finite number")]),
        (b'{"mu": [0], "logvar": [Infinity]}', [(("body", "logvar", 0), "Input should be a finite number")]),
        (b'{"mu": ["1"], "logvar": [0]}', [(("body", "mu", 0), "Input should be a valid number")]),
        (
            b'{"mu": [], "logvar": []}',
            [
                (("body", "mu"), "List should have at least 1 item after validation, not 0"),
                (("body", "logvar"), "List should have at least 1 item after validation, not 0"),
            ],
        ),
        (
            b'{"mu": [0], "logvar": [1000]}',
            [(("body", "logvar", 0), "Input should be less than or equal to 100")],
        ),
        (b'{"mu": [0]}', [(("body", "logvar"), "Field required")]),
        # One bad number among good ones is one error, where it is, in the shape sent (one vector or a batch):
        # not one more for every number that is not a vector, as if a batch had been meant.
        (
            b'{"mu": [10000000, 0, 0, 0], "logvar": [0, 0, 0, 0]}',
            [(("body", "mu", 0), "Input should be less than or equal to 1000000")],
        ),
        (
            b'{"mu": [[0, 0], [0, 1e7]], "logvar": [[0, 0], [0, 0]]}',
            [(("body", "mu", 1, 1), "Input should be less than or equal to 1000000")],
        ),
        (b'{"mu": 5, "logvar": [0]}', [(("body", "mu"), "Input should be a valid array")]),
        (b'{"mu": [[0], 5], "logvar": [[0], [0]]}', [(("body", "mu", 1), "Input should be a valid array")]),
    ],
    ids=[
        "nan",
        "infinity",
        "string",
        "empty",
        "logvar-overflow",
        "missing-logvar",
        "one-vector-overflow",
        "batch-overflow",
        "number",
        "batch-with-a-number",
    ],
)
def test_bad_numbers_are_422(
    client: TestClient, raw: bytes, expected: list[tuple[tuple[object, ...], str]]
) -> None:
    response = client.post("/kl", content=raw, headers={"content-type": "application/json"})
    assert messages(response) == expected


def test_too_many_posteriors_is_422(limited: TestClient, card: ModelCard) -> None:
    n = LIMITS["max_latents"] + 1
    payload = {"mu": [[0.0] * card.latent_dim] * n, "logvar": [[0.0] * card.latent_dim] * n}
    expected = f"{n} vectors sent; this server takes at most {n - 1} per request"
    assert messages(limited.post("/kl", json=payload)) == [(("body", "mu"), expected)]


def test_too_many_images_is_422(limited: TestClient) -> None:
    n = LIMITS["max_images"] + 1
    response = limited.post("/kl", files=files(*[digit_png(i) for i in range(n)]))
    expected = f"more than {n - 1} images sent; this server takes at most {n - 1} per request"
    assert messages(response) == [(("body", "files"), expected)]
