"""`make train-quality` (bench/train_quality.py): both recipes' losses, in nats per image, and its JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import REPO
from training.train import TrainConfig, load_splits


def grey_level_floor(images: np.ndarray) -> float:
    """The least binary cross-entropy any decoder scores on `images`, per image: the pixels' own entropy."""
    p = np.clip(images.reshape(len(images), -1).astype(np.float64), 1e-12, 1 - 1e-12)
    return float(-(p * np.log(p) + (1 - p) * np.log1p(-p)).sum(axis=1).mean())


def test_both_recipes_report_per_image_losses_above_what_the_pixels_allow(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    command = [sys.executable, "bench/train_quality.py", "--epochs", "12", "--seeds", "3", "--json", str(out)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, check=True)
    assert "mean over seeds [3], 12 epochs: reference" in run.stdout, run.stdout

    (row,) = json.loads(out.read_text())["runs"]
    assert json.loads(out.read_text())["epochs"] == 12 and row["seed"] == 3
    splits = load_splits(TrainConfig(seed=3))
    test_floor, train_floor = grey_level_floor(splits.test.images), grey_level_floor(splits.train.images)
    # Sums over each image's 64 pixels plus a KL of at least 0: a mean over pixels, or a sum over the batch,
    # would land far outside this range, whose top is what predicting 0.5 everywhere scores.
    for key, floor in (
        ("reference", test_floor),
        ("default", test_floor),
        ("reference_train", train_floor),
        ("default_train", train_floor),
    ):
        assert math.isfinite(row[key]) and floor < row[key] < 64 * math.log(2), (key, row[key], floor)
