"""Fixtures shared by the training and service tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "default"
SCHEMA = REPO / "models" / "model_card.schema.json"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-epoch run of a tiny MLP VAE on digits: the run directory with best.pt and last.pt."""
    from training.__main__ import main

    out = tmp_path_factory.mktemp("tiny-run")
    argv = ["train", "--out", str(out), "--epochs", "2", "--warmup-epochs", "1", "--hidden", "32"]
    assert main([*argv, "--latent-dim", "3", "--seed", "7", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_run` exported: encoder.onnx, decoder.onnx, model.json and plots."""
    from training.__main__ import main

    out = tmp_path_factory.mktemp("tiny-model")
    assert (
        main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out), "--iwae-samples", "8"])
        == 0
    )
    return out
