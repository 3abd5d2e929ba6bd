"""The objective, the training loop, checkpoints and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.__main__ import main
from training.train import load_checkpoint, objective


def test_objective_is_mean_recon_plus_beta_kl() -> None:
    recon = torch.tensor([10.0, 20.0])
    kl = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # batch-mean KL per dimension: [2, 0]
    assert float(objective(recon, kl, beta=1.0, free_bits=0.0)) == 17.0
    assert float(objective(recon, kl, beta=0.5, free_bits=0.0)) == 16.0
    # Free bits floor each dimension's batch-mean KL: [2, 0] -> [2, 0.5]
    assert float(objective(recon, kl, beta=1.0, free_bits=0.5)) == 17.5


def test_checkpoint_rebuilds_the_model_and_history(tiny_run: Path) -> None:
    ckpt = load_checkpoint(tiny_run / "best.pt")
    assert ckpt.config["latent_dim"] == 3 and ckpt.config["hidden"] == [32]
    assert ckpt.train_config["seed"] == 7
    assert [row["epoch"] for row in ckpt.history] == [1, 2]
    model = ckpt.build()
    assert not model.training
    mu, _ = model.encoder(torch.rand((2, 1, 8, 8)))
    assert mu.shape == (2, 3)


def test_resume_continues_where_the_run_stopped(tmp_path: Path) -> None:
    # A constant learning rate, so that 2 + 1 epochs follow exactly the schedule of 3.
    common = ["--hidden", "16", "--latent-dim", "2", "--seed", "3", "--warmup-epochs", "1", "--no-progress"]
    common += ["--lr-schedule", "constant"]
    assert main(["train", "--out", str(tmp_path / "full"), "--epochs", "3", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "split"), "--epochs", "2", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "split"), "--epochs", "3", "--resume", *common]) == 0
    full = load_checkpoint(tmp_path / "full" / "last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")
    assert resumed.epoch == 3 and len(resumed.history) == 3
    for name, tensor in full.model.items():
        torch.testing.assert_close(resumed.model[name], tensor, msg=name)


def test_evaluate_prints_metrics(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--checkpoint", str(tiny_run / "best.pt"), "--iwae-samples", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 359 and metrics["iwae_samples"] == 4
    assert metrics["neg_elbo"] == pytest.approx(metrics["reconstruction"] + metrics["kl"])
    assert 0 <= metrics["active_units"] <= 3


def test_cli_reports_bad_data_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--out", str(tmp_path / "run"), "--dataset", "idx", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "expected train-images-idx3-ubyte" in capsys.readouterr().err
