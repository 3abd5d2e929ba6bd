"""The reconstruction term, against torch's binary cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.likelihood import bernoulli_nll


def torch_bce(x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    target, p = torch.from_numpy(x), torch.from_numpy(probs)
    return F.binary_cross_entropy(p, target, reduction="none").flatten(1).sum(1).numpy()


def test_agrees_with_torch_bce_per_image() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(5, 1, 8, 8))
    probs = rng.uniform(0.01, 0.99, size=(5, 1, 8, 8))
    # log1p(-p) against torch's log(1 - p): equal to float64 rounding.
    np.testing.assert_allclose(bernoulli_nll(x, probs), torch_bce(x, probs), rtol=1e-10)


@pytest.mark.parametrize(
    ("x", "p"), [(1.0, 0.0), (0.0, 1.0)], ids=["certain-miss-of-ink", "certain-miss-of-paper"]
)
def test_saturated_probabilities_are_clamped_like_torch(x: float, p: float) -> None:
    x_array, p_array = np.full((1, 4), x), np.full((1, 4), p)
    assert bernoulli_nll(x_array, p_array)[0] == pytest.approx(400.0)  # four pixels at the -100 log floor
    np.testing.assert_allclose(bernoulli_nll(x_array, p_array), torch_bce(x_array, p_array))


def test_perfect_binary_reconstruction_costs_nothing() -> None:
    x = np.array([[0.0, 1.0, 1.0, 0.0]])
    assert bernoulli_nll(x, x)[0] == 0.0
