"""The reconstruction term, against torch's binary cross-entropy with logits (what `training` computes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.likelihood import bernoulli_nll


def torch_bce(x: np.ndarray, logits: np.ndarray) -> np.ndarray:
    target, logit = torch.from_numpy(x), torch.from_numpy(logits)
    return F.binary_cross_entropy_with_logits(logit, target, reduction="none").flatten(1).sum(1).numpy()


def test_agrees_with_torch_per_image() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(5, 1, 8, 8))
    logits = rng.normal(scale=10.0, size=(5, 1, 8, 8))  # many beyond where float32 means round to 0 or 1
    np.testing.assert_allclose(bernoulli_nll(x, logits), torch_bce(x, logits), rtol=1e-12)


@pytest.mark.parametrize(
    ("x", "logit", "nats"),
    [(1.0, -30.0, 30.0), (0.99, 20.0, 0.2), (0.0, 40.0, 40.0)],
    ids=["ink-where-paper-is-certain", "grey-where-ink-is-certain", "paper-where-ink-is-certain"],
)
def test_saturated_logits_cost_what_they_say(x: float, logit: float, nats: float) -> None:
    """Where float32 means are 0 or 1, a pixel costs |l| times its distance from them: log(0), clamped at
    -100 as torch's binary_cross_entropy does, charged 100 times it."""
    assert bernoulli_nll(np.full((1, 4), x), np.full((1, 4), logit))[0] == pytest.approx(4 * nats, rel=1e-6)


def test_a_certain_and_right_pixel_costs_nothing() -> None:
    x = np.array([[0.0, 1.0, 1.0, 0.0]])
    logits = np.array([[-800.0, 800.0, 800.0, -800.0]])
    assert bernoulli_nll(x, logits)[0] == 0.0
