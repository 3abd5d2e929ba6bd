"""POST /reconstruct, and the round trip encode -> decode against the model card's test metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from service.model_card import ModelCard
from service.schemas import DecodeResponse, EncodeResponse, ReconstructResponse
from tests.service.helpers import b64, body, decoded_png, detail, digit_png, digits, files, messages, png


def torch_bce(x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """-log p(x | probs) per image, summed over pixels, by torch."""
    target, p = torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(np.asarray(probs, np.float64))
    return F.binary_cross_entropy(p, target, reduction="none").flatten(1).sum(1).numpy()


def test_loss_is_the_bernoulli_nll_of_the_input(client: TestClient, card: ModelCard) -> None:
    indices = [0, 1, 2]
    response = client.post("/reconstruct?format=array", files=files(*[digit_png(i) for i in indices]))
    result = body(response, ReconstructResponse)
    assert np.shape(result.images) == (3, *card.input_shape)
    # The service reads the 8-bit PNGs: the targets are the digits quantised to 1/255.
    x = (digits()[indices] / 16.0 * 255.0).round() / 255.0
    np.testing.assert_allclose(
        result.reconstruction, torch_bce(x[:, None], np.asarray(result.images)), rtol=1e-5
    )


def test_loss_is_exact_where_the_decoder_is_certain(
    client: TestClient, model_dir: Path, card: ModelCard
) -> None:
    """A horizontal bar, unlike any digit: the decoder is certain of pixels it gets wrong, with logits past
    where float32 means round to 0 or 1. Each costs |logit| times its error (the logits' cross-entropy, as
    the model card's term), where the means' log(0), clamped at -100, charged 100 times it."""
    bar = np.zeros((8, 8), np.uint8)
    bar[3:5, :] = 255
    x = (bar / 255.0)[None, None]
    result = body(client.post("/reconstruct", files=files(png(bar))), ReconstructResponse)
    (mu,) = body(client.post("/encode", files=files(png(bar))), EncodeResponse).mu
    decoder = ort.InferenceSession(str(model_dir / card.decoder.file), providers=["CPUExecutionProvider"])
    x_mean, logits = decoder.run(["x_mean", "logits"], {"z": np.asarray([mu], np.float32)})
    assert np.abs(logits).max() > 17  # where float32 sigmoids are 0 or 1
    want = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logits.astype(np.float64)), torch.from_numpy(x), reduction="sum"
    )
    assert result.reconstruction[0] == pytest.approx(float(want), rel=1e-6)
    assert torch_bce(x, x_mean)[0] > float(want) + 10  # what the means alone gave


def test_reconstruction_is_decode_of_mu(client: TestClient) -> None:
    images = files(digit_png(4), digit_png(5))
    reconstructed = body(client.post("/reconstruct?format=array", files=images), ReconstructResponse)
    mu = body(client.post("/encode", files=images), EncodeResponse).mu
    decoded = body(client.post("/decode?format=array", json={"latents": mu}), DecodeResponse)
    np.testing.assert_allclose(reconstructed.images, decoded.images, rtol=1e-5, atol=1e-6)


def test_png_and_grid(client: TestClient, card: ModelCard) -> None:
    _, h, w = card.input_shape
    result = body(
        client.post("/reconstruct?scale=2", json={"images": [b64(digit_png(0))]}), ReconstructResponse
    )
    assert isinstance(result.images[0], str)
    assert decoded_png(result.images[0]).shape[:2] == (2 * h, 2 * w)
    grid = client.post("/reconstruct?format=grid", files=files(digit_png(0), digit_png(1)))
    assert grid.headers["content-type"] == "image/png"
    assert decoded_png(grid.content).shape[:2] == (h, 2 * w + 1)


def test_inputs_are_the_images_as_the_model_reads_them(client: TestClient, card: ModelCard) -> None:
    _, h, w = card.input_shape
    # A 4x-enlarged digit: the model reads it shrunk back to its input size.
    big = digits()[3].repeat(4, axis=0).repeat(4, axis=1)
    upload = files(png((big / 16.0 * 255.0).round().astype(np.uint8)))
    as_arrays = body(client.post("/reconstruct?format=array&inputs=true", files=upload), ReconstructResponse)
    assert as_arrays.inputs is not None
    # Box-filter shrinking of 4x4 blocks of one value gives that value back, up to float rounding.
    expected = (digits()[3] / 16.0 * 255.0).round() / 255.0
    np.testing.assert_allclose(np.asarray(as_arrays.inputs)[0, 0], expected, atol=1e-6)
    as_pngs = body(client.post("/reconstruct?scale=2&inputs=true", files=upload), ReconstructResponse)
    assert as_pngs.inputs is not None and isinstance(as_pngs.inputs[0], str)
    assert decoded_png(as_pngs.inputs[0]).shape[:2] == (2 * h, 2 * w)
    inverted = body(
        client.post("/reconstruct?format=array&inputs=true&invert=true", files=upload), ReconstructResponse
    )
    np.testing.assert_allclose(np.asarray(inverted.inputs)[0, 0], 1.0 - expected, atol=1e-6)


def test_inputs_only_when_asked(client: TestClient) -> None:
    response = client.post("/reconstruct", files=files(digit_png(0)))
    assert "inputs" not in response.json()
    grid = client.post("/reconstruct?format=grid&inputs=true", files=files(digit_png(0)))
    assert messages(grid) == [
        (("query", "inputs"), "inputs=true comes back beside the images in JSON: use format=png or array")
    ]


def test_errors(client: TestClient) -> None:
    assert (
        detail(client.post("/reconstruct", files=files(b"")), 400)
        == "file 0 ('image0.png') is empty (0 bytes)"
    )
    response = client.post("/reconstruct", content=b"x", headers={"content-type": "image/png"})
    assert detail(response, 415).startswith("content type 'image/png' is not supported here")


def digits_test_split(card: ModelCard) -> np.ndarray:
    """The card's test split of the digits, as training draws it: the first `test` of a seeded permutation."""
    split = card.dataset.split
    n = len(digits())
    assert split.train + split.val + split.test == n, "the card's split does not partition the digits"
    return np.sort(np.random.default_rng(split.seed).permutation(n)[: split.test])


def test_round_trip_matches_the_card(client: TestClient, card: ModelCard) -> None:
    if card.dataset.name != "digits":
        pytest.skip("the round trip reproduces the digits test split")
    indices = digits_test_split(card)
    x = digits()[indices] / 16.0
    pngs = [b64(png_bytes) for png_bytes in map(digit_png, indices)]
    mu: list[list[float]] = []
    for start in range(0, len(pngs), 64):  # within the default VAE_MAX_IMAGES
        mu += body(client.post("/encode", json={"images": pngs[start : start + 64]}), EncodeResponse).mu
    x_mean: list[object] = []
    for start in range(0, len(mu), 256):  # within the default VAE_MAX_LATENTS
        response = client.post("/decode?format=array", json={"latents": mu[start : start + 256]})
        x_mean += body(response, DecodeResponse).images
    loss = float(torch_bce(x[:, None], np.asarray(x_mean)).mean())
    # The card's term is a one-sample estimate at z ~ q(z|x); decoding mu is at least as good on average, and
    # the acceptance bound is 10 %.
    assert loss == pytest.approx(card.metrics.reconstruction, rel=0.10)
