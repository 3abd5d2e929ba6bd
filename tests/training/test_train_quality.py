"""`make train-quality` (bench/train_quality.py): both recipes', MADE's and the mixture's losses, in nats per
image, its JSON, MADE's ordering and the mixture's likelihood."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from tests.conftest import REPO
from training.train import TrainConfig, load_splits


def grey_level_floor(images: np.ndarray) -> float:
    """The binary cross-entropy of a perfect decoder on `images` (each pixel's mean its own grey level), per
    image: what no decoder scores below."""
    x = torch.from_numpy(images).double()
    return float(F.binary_cross_entropy(x, x, reduction="sum")) / len(images)


def test_both_recipes_report_per_image_losses_above_what_the_pixels_allow(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    command = [
        *(sys.executable, "bench/train_quality.py", "--epochs", "12", "--seeds", "3", "--json", str(out)),
        *("--em-iterations", "20"),
        *("--variants", "long-warm-up"),
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, check=True)
    assert "mean over seeds [3], 12 epochs: reference" in run.stdout, run.stdout
    assert "variant long-warm-up (warmup_epochs=50): " in run.stdout, run.stdout

    (row,) = json.loads(out.read_text())["runs"]
    assert json.loads(out.read_text())["epochs"] == 12 and row["seed"] == 3
    splits = load_splits(TrainConfig(seed=3))
    test_floor, train_floor = grey_level_floor(splits.test.images), grey_level_floor(splits.train.images)
    assert math.isclose(row["floor"], test_floor) and math.isclose(row["floor_train"], train_floor)
    # Still warming up after 12 epochs (KL weight 0.24), the variant scores differently from the default.
    variant = row["variants"]["long-warm-up"]
    assert variant["test"] != row["default"]
    bench = _bench()
    assert row["mixture_components"] in bench.MIXTURE_COMPONENTS
    assert row["mixture_smoothing"] in bench.MIXTURE_SMOOTHING
    # Sums over each image's 64 pixels plus a KL of at least 0: a mean over pixels, or a sum over the batch,
    # would land far outside this range, whose top is what predicting 0.5 everywhere scores.
    for key, floor in (
        ("reference", test_floor),
        ("default", test_floor),
        ("reference_train", train_floor),
        ("default_train", train_floor),
        ("autoregressive", test_floor),
        ("autoregressive_train", train_floor),
        ("mixture", test_floor),
        ("mixture_train", train_floor),
    ):
        assert math.isfinite(row[key]) and floor < row[key] < 64 * math.log(2), (key, row[key], floor)
    for key, floor in (("test", test_floor), ("train", train_floor)):
        assert math.isfinite(variant[key]) and floor < variant[key] < 64 * math.log(2), (key, variant, floor)


def test_the_autoregressive_model_sees_only_the_pixels_before_each_one() -> None:
    """MADE's loss is a likelihood only if each pixel's logit depends on the pixels before it alone: one that
    saw itself would copy its own value and score near the grey-level floor."""
    pixels = 64
    model = _bench().MADE(pixels, hidden=256, seed=0)
    x = torch.rand(1, pixels, requires_grad=True)
    for i in range(pixels):
        (gradient,) = torch.autograd.grad(model(x)[0, i], x)
        assert torch.all(gradient[0, i:] == 0), i  # itself and every later pixel: no influence
        if i > 0:
            assert torch.any(gradient[0, :i] != 0), i  # the earlier ones do reach it


def _bench() -> ModuleType:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import train_quality
    finally:
        sys.path.remove(str(REPO / "bench"))
    return train_quality


def test_the_mixture_loss_is_the_exact_likelihood_of_its_images() -> None:
    """Summed over every binary image of 3 pixels, the mixture's likelihood is 1: its loss is an exact
    log-likelihood, not a bound. Each image's is the weighted sum of its components' Bernoulli products."""
    means = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.7, 0.3]], dtype=torch.float64)
    mixture = _bench().BernoulliMixture(means, torch.tensor([0.25, 0.75], dtype=torch.float64))
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)
    likelihoods = [math.exp(-mixture.loss_per_image(image[None])) for image in images]
    assert math.isclose(sum(likelihoods), 1.0, rel_tol=1e-12)
    by_hand = 0.25 * 0.9 * 0.8 * 0.6 + 0.75 * 0.1 * 0.3 * 0.3  # the image (1, 0, 1)
    assert math.isclose(likelihoods[5], by_hand, rel_tol=1e-12)


def test_em_recovers_a_mixture_it_is_given_samples_of() -> None:
    """Fitted to 4000 samples of a known mixture of 3 components, EM scores new samples as the known mixture
    does, to within 0.05 nats an image; where it started from scores them worse by more than a nat."""
    bench = _bench()
    generator = torch.Generator().manual_seed(0)
    truth = bench.BernoulliMixture(
        torch.rand(3, 32, generator=generator, dtype=torch.float64) * 0.9 + 0.05,
        torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64),
    )

    def draw(n: int) -> torch.Tensor:
        component = torch.multinomial(truth.weights, n, replacement=True, generator=generator)
        return torch.bernoulli(truth.means[component], generator=generator).float()

    train, held_out = draw(4000), draw(4000)
    fitted = bench.fit_bernoulli_mixture(train, 3, 0.02, seed=0, iterations=500)
    started = bench.fit_bernoulli_mixture(train, 3, 0.02, seed=0, iterations=0)
    assert abs(fitted.loss_per_image(held_out) - truth.loss_per_image(held_out)) < 0.05
    assert started.loss_per_image(held_out) > truth.loss_per_image(held_out) + 1
