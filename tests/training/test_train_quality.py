"""`make train-quality` (bench/train_quality.py): both recipes' and MADE's losses, in nats per image, its
JSON, and MADE's ordering."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

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
    # Sums over each image's 64 pixels plus a KL of at least 0: a mean over pixels, or a sum over the batch,
    # would land far outside this range, whose top is what predicting 0.5 everywhere scores.
    for key, floor in (
        ("reference", test_floor),
        ("default", test_floor),
        ("reference_train", train_floor),
        ("default_train", train_floor),
        ("autoregressive", test_floor),
        ("autoregressive_train", train_floor),
    ):
        assert math.isfinite(row[key]) and floor < row[key] < 64 * math.log(2), (key, row[key], floor)
    for key, floor in (("test", test_floor), ("train", train_floor)):
        assert math.isfinite(variant[key]) and floor < variant[key] < 64 * math.log(2), (key, variant, floor)


def test_the_autoregressive_model_sees_only_the_pixels_before_each_one() -> None:
    """MADE's loss is a likelihood only if each pixel's logit depends on the pixels before it alone: one that
    saw itself would copy its own value and score near the grey-level floor."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from train_quality import MADE
    finally:
        sys.path.remove(str(REPO / "bench"))
    pixels = 64
    model = MADE(pixels, hidden=256, seed=0)
    x = torch.rand(1, pixels, requires_grad=True)
    for i in range(pixels):
        (gradient,) = torch.autograd.grad(model(x)[0, i], x)
        assert torch.all(gradient[0, i:] == 0), i  # itself and every later pixel: no influence
        if i > 0:
            assert torch.any(gradient[0, :i] != 0), i  # the earlier ones do reach it
