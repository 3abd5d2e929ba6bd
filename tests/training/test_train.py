"""The objective, the training loop, checkpoints and the CLI."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm

import training.train as train_module
from training.__main__ import main
from training.model import VAE, VAEConfig
from training.train import Splits, TrainConfig, load_checkpoint, load_splits, objective


def test_objective_is_mean_recon_plus_beta_kl() -> None:
    recon = torch.tensor([10.0, 20.0])
    kl = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # batch-mean KL per dimension: [2, 0]
    assert float(objective(recon, kl, beta=1.0, free_bits=0.0)) == 17.0
    assert float(objective(recon, kl, beta=0.5, free_bits=0.0)) == 16.0
    # Free bits floor each dimension's batch-mean KL: [2, 0] -> [2, 0.5]
    assert float(objective(recon, kl, beta=1.0, free_bits=0.5)) == 17.5


def test_free_bits_floor_each_dimensions_batch_mean_kl_not_each_images() -> None:
    """Kingma et al. (2016): a dimension whose KL averaged over the batch is below the floor costs the floor.
    Flooring each image's KL instead would charge dimension 0 for the image that does not use it."""
    recon = torch.tensor([10.0, 20.0])
    kl = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # batch-mean KL per dimension: [0.5, 0]
    # [0.5, 0] -> [0.6, 0.6]; floored per image, [[1, 0.6], [0.6, 0.6]] would average to [0.8, 0.6].
    assert float(objective(recon, kl, beta=1.0, free_bits=0.6)) == pytest.approx(15.0 + 1.2)
    assert float(objective(recon, kl, beta=0.5, free_bits=0.6)) == pytest.approx(15.0 + 0.6)


class _Ranks:
    """`Context.average` where the ranks together hold `batch`: the whole batch's mean KL per dimension."""

    def __init__(self, batch: torch.Tensor) -> None:
        self.mean = batch.mean(0)

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.mean


def test_free_bits_over_processes_take_the_step_of_one_process() -> None:
    """Under torchrun each process floors the mean KL of the whole batch, not of its share: DDP's average of
    the shares' gradients is then the gradient of one process on the whole batch. Dimension 0's batch mean
    (0.45) is above the floor, though the second share's alone (0.05) is below it."""
    kl = torch.tensor([[0.9, 0.1], [0.8, 0.1], [0.05, 0.1], [0.05, 0.1]], requires_grad=True)
    recon = torch.zeros(4)
    objective(recon, kl, beta=1.0, free_bits=0.4).backward()  # type: ignore[no-untyped-call]
    one_process = kl.grad.clone()  # type: ignore[union-attr]
    shares, ranks = [], _Ranks(kl.detach())
    for rows in (slice(0, 2), slice(2, 4)):
        share = kl.detach()[rows].clone().requires_grad_()
        objective(recon[rows], share, beta=1.0, free_bits=0.4, ctx=ranks).backward()  # type: ignore[arg-type, no-untyped-call]
        assert share.grad is not None
        shares.append(share.grad)
    ddp = torch.cat(shares) / 2  # each share's gradient, averaged over the two processes
    torch.testing.assert_close(ddp, one_process)
    assert ddp[:, 0].tolist() == [0.25] * 4 and ddp[:, 1].tolist() == [0.0] * 4


def test_checkpoint_rebuilds_the_model_and_history(tiny_run: Path) -> None:
    ckpt = load_checkpoint(tiny_run / "best.pt")
    assert ckpt.config["latent_dim"] == 3 and ckpt.config["hidden"] == [32]
    assert ckpt.train_config["seed"] == 7
    assert [row["epoch"] for row in ckpt.history] == [1, 2]
    model = ckpt.build()
    assert not model.training
    mu, _ = model.encoder(torch.rand((2, 1, 8, 8)))
    assert mu.shape == (2, 3)


def test_the_cli_reads_the_data_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The image shape comes from the data; the splits read for it are the ones trained on (a folder of
    # images is decoded once, not twice).
    calls: list[object] = []

    def counted(cfg: object) -> Splits:
        calls.append(cfg)
        return load_splits(cfg)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "load_splits", counted)
    argv = ["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--hidden", "8", "--latent-dim", "2"]
    assert main([*argv, "--no-progress"]) == 0
    assert len(calls) == 1


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


# Small and quick: a one-layer model, a few epochs.
QUICK = ["--hidden", "16", "--latent-dim", "2", "--warmup-epochs", "1", "--no-progress"]


def test_resume_takes_the_runs_own_settings_and_refuses_other_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "2", "--seed", "5", *QUICK]) == 0
    # Flags left out are the run's, not the defaults.
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 0
    resumed = load_checkpoint(run / "last.pt")
    assert resumed.epoch == 3 and resumed.train_config["seed"] == 5 and resumed.config["hidden"] == [16]
    # A setting that would change the data or the optimisation is named, with the run's own value.
    code = main(["train", "--out", str(run), "--resume", "--epochs", "4", "--val-fraction", "0.3"])
    assert code == 2
    assert "val_fraction 0.3 (the run's: 0.1)" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--epochs", "4", "--lr-schedule", "constant"]) == 2
    assert "lr_schedule 'constant' (the run's: 'cosine')" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3"]) == 2
    assert "the run has done 3 epochs" in capsys.readouterr().err


def test_resume_with_more_epochs_follows_the_longer_cosine(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "2", *QUICK]) == 0
    assert load_checkpoint(run / "last.pt").history[-1]["lr"] == pytest.approx(2e-3 * 0.02)  # the minimum
    assert main(["train", "--out", str(run), "--resume", "--epochs", "4", "--no-progress"]) == 0
    history = load_checkpoint(run / "last.pt").history
    # The rate at the end of epoch 3 of 4 on a cosine from 2e-3 to 4e-5, not stuck at the minimum.
    assert history[2]["lr"] == pytest.approx(4e-5 + (2e-3 - 4e-5) * (1 + math.cos(0.75 * math.pi)) / 2)
    assert history[3]["lr"] == pytest.approx(4e-5)


def test_a_fresh_run_leaves_no_best_checkpoint_of_an_earlier_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "2", *QUICK]) == 0
    assert (run / "best.pt").exists()
    # Fewer epochs than the warm-up: this run has no best of its own, so its last is the one reported.
    args = ["--hidden", "8", "--latent-dim", "2", "--warmup-epochs", "5", "--no-progress"]
    assert main(["train", "--out", str(run), "--epochs", "1", *args]) == 0
    best = load_checkpoint(run / "best.pt")
    assert best.config["hidden"] == [8] and best.epoch == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
        (["--epochs", "0"], "epochs must be at least 1, got 0"),
        (["--latent-dim", "-2"], "latent_dim must be at least 1, got -2"),
        (["--hidden", "0"], "hidden must be one or more sizes of at least 1, got [0]"),
        (["--threads", "-1"], "threads must be at least 0, got -1"),
        (["--warmup-epochs", "-1"], "warmup_epochs must be a finite number, 0 or more, got -1.0"),
        (["--warmup-epochs", "inf"], "warmup_epochs must be a finite number, 0 or more, got inf"),
        (["--beta", "nan"], "beta must be a finite number, 0 or more, got nan"),
        (["--beta", "inf"], "beta must be a finite number, 0 or more, got inf"),
        (["--free-bits", "inf"], "free_bits must be a finite number, 0 or more, got inf"),
        (["--weight-decay", "inf"], "weight_decay must be a finite number, 0 or more, got inf"),
        (["--ema-decay", "1"], "ema_decay must be in [0, 1)"),
        (["--lr", "0"], "lr must be a finite number above 0, got 0.0"),
        (["--lr", "inf"], "lr must be a finite number above 0, got inf"),
        (["--lr", "1e38"], "lr must be in (0, 1], got 1e+38"),  # was Adam's overflow traceback
        (["--seed", str(2**64 - 1)], f"seed must be at most {2**32 - 1}, got {2**64 - 1}"),
        (["--threads", "100000"], "--threads 100000 is more than this machine's"),
        (
            ["--architecture", "conv", "--hidden", "7"],
            "--hidden sizes the mlp's layers; conv takes --conv-channels",
        ),
        (["--conv-dense", "5"], "--conv-dense is for the conv architecture; mlp takes --hidden"),
        (["--conv-channels", "3"], "--conv-channels is for the conv architecture"),
        (
            ["--lr-schedule", "constant", "--lr-min-ratio", "0.5"],
            "--lr-min-ratio is where the cosine schedule",
        ),
        (["--logvar-max", "inf"], "logvar_min must be below logvar_max, both finite, got [-30.0, inf]"),
        (["--lr-min-ratio", "5"], "lr_min_ratio must be in (0, 1], got 5.0"),
        (["--test-fraction", "0"], "test_fraction must be in (0, 1), got 0.0"),
        (["--val-fraction", "0.6", "--test-fraction", "0.6"], "val_fraction + test_fraction must leave"),
        (["--channels", "2"], "channels must be 1 or 3, got 2"),
        (["--logvar-min", "5", "--logvar-max", "-5"], "logvar_min must be below logvar_max"),
        (["--data-dir", "somewhere"], "--data-dir is for the idx and folder datasets"),
        (["--seed", "-1"], "seed must be at least 0, got -1"),
        (["--image-size", "28"], "--image-size is for the folder dataset; digits images keep their own size"),
        # Was numpy's traceback, failing to allocate the images.
        (["--dataset", "folder", "--image-size", "100000"], "image_size must be at most 1024, got 100000"),
        (["--channels", "3"], "--channels is for the folder dataset"),
        (["--foreground", "dark"], "--foreground describes idx and folder images; digits are light strokes"),
    ],
)
def test_bad_settings_are_named_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--hidden", "2000000000"], "--hidden 2000000000 and --latent-dim 16"),
        (
            ["--architecture", "conv", "--conv-channels", "4", "--conv-dense", "2000000000"],
            "--conv-channels 4 --conv-dense 2000000000",
        ),
    ],
    ids=["mlp", "conv"],
)
def test_a_model_too_large_for_memory_is_named_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    """A typo of a few zeros: torch's allocator refuses its hundreds of gigabytes at once, before any
    weight is written."""
    assert main(["train", "--out", str(tmp_path / "run"), "--epochs", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert f"error: the model's weights do not fit in cpu memory with {named}" in err
    assert "Traceback" not in err


def test_test_fraction_is_refused_where_the_idx_data_has_its_own_test_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "idx"
    data.mkdir()
    images = np.zeros((20, 4, 4), np.uint8)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (data / name).write_bytes(b"\0\0\x08\x03" + np.array([20, 4, 4], ">u4").tobytes() + images.tobytes())
    run = ["train", "--out", str(tmp_path / "run"), "--dataset", "idx", "--data-dir", str(data)]
    assert main([*run, "--test-fraction", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--test-fraction holds out part of the training images as the test set" in err
    assert "t10k-images-idx3-ubyte" in err and not (tmp_path / "run").exists()


def test_a_run_whose_loss_becomes_nan_stops_at_that_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, a diverged run went on to its end and wrote a best.pt of NaN weights, with exit status 0."""
    calls = 0

    def diverging(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = objective(*args, **kwargs)
        return loss * math.nan if calls > 45 else loss  # during epoch 2 (40 steps an epoch)

    monkeypatch.setattr(train_module, "objective", diverging)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "4", "--batch-size", "32", *QUICK]) == 2
    assert (
        "the training loss became nan in epoch 2: the run diverged (a lower --lr may help); "
        f"{run / 'last.pt'} holds epoch 1" in capsys.readouterr().err
    )
    last = load_checkpoint(run / "last.pt")
    assert last.epoch == 1 and all(torch.isfinite(t).all() for t in last.model.values())
    # Diverged in its first epoch: there is no epoch before to point to, nor a checkpoint of the run that
    # was in --out before (--resume would have continued that one).
    calls = 1000  # every loss NaN from the first step on
    assert main(["train", "--out", str(run), "--epochs", "4", *QUICK]) == 2
    assert (
        "in epoch 1: the run diverged (a lower --lr may help); no checkpoint was written"
        in capsys.readouterr().err
    )
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()


def test_a_choice_flag_takes_only_its_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path), "--lr-schedule", "cosin"])
    assert exit_info.value.code == 2
    assert (
        "--lr-schedule: invalid choice: 'cosin' (choose from 'constant', 'cosine')" in capsys.readouterr().err
    )


def test_a_folder_of_rgb_images_trains_from_the_command_line(tmp_path: Path) -> None:
    """`--channels 3` (the folder dataset's option) reaches the data, and the model takes its shape."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    run = tmp_path / "run"
    data = ["--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--image-size", "6"]
    assert main(["train", "--out", str(run), "--epochs", "1", *data, "--channels", "3", *QUICK]) == 0
    best = load_checkpoint(run / "best.pt")
    assert (best.config["channels"], best.config["height"], best.config["width"]) == (3, 6, 6)
    assert best.train_config["channels"] == 3


def test_the_kl_weight_rises_linearly_at_every_step_of_the_warm_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The KL weight goes from 0 to beta over `warmup_epochs`, step by step, then stays at beta. Digits'
    1258 training images in batches of 420 make three steps an epoch."""
    betas: list[float] = []

    def recorded(
        recon: torch.Tensor, kl: torch.Tensor, beta: float, free_bits: float, ctx: Any
    ) -> torch.Tensor:
        betas.append(beta)
        return objective(recon, kl, beta, free_bits, ctx)

    monkeypatch.setattr(train_module, "objective", recorded)
    args = ["--epochs", "3", "--warmup-epochs", "2", "--beta", "2", "--batch-size", "420", "--no-progress"]
    assert main(["train", "--out", str(tmp_path / "run"), *args, "--hidden", "8", "--latent-dim", "2"]) == 0
    assert betas == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0, 2.0, 2.0])


def test_no_epoch_of_the_warm_up_is_taken_as_the_best(tmp_path: Path) -> None:
    """Before the KL weight reaches beta the model is fitted to another objective: a run that ends inside
    the warm-up has no best epoch yet (a resumed run's first epoch past it will be), and best.pt is its
    last epoch."""
    run = tmp_path / "run"
    args = ["--hidden", "8", "--latent-dim", "2", "--warmup-epochs", "3", "--no-progress"]
    assert main(["train", "--out", str(run), "--epochs", "2", *args]) == 0
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert last.best_val == best.best_val == math.inf
    assert best.epoch == last.epoch == 2


def test_a_run_resumed_inside_the_warm_up_reports_its_last_epoch(tmp_path: Path) -> None:
    """No epoch has passed the warm-up in either part of the run: best.pt is the last epoch, not the copy of
    the first part's last epoch."""
    run = tmp_path / "run"
    args = ["--hidden", "8", "--latent-dim", "2", "--warmup-epochs", "10", "--no-progress"]
    assert main(["train", "--out", str(run), "--epochs", "2", *args]) == 0
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 0
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert best.epoch == last.epoch == 3
    for name, weights in best.model.items():
        assert torch.equal(weights, last.model[name]), name


def test_a_run_stopped_while_saving_leaves_its_last_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "1", *QUICK]) == 0
    real_save = torch.save

    def stopped(state: object, path: Path) -> None:  # half of last.pt written, then Ctrl-C
        real_save(state, path)
        if Path(path).name.startswith("last.pt"):
            Path(path).write_bytes(Path(path).read_bytes()[:100])
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module.torch, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"])
    monkeypatch.setattr(train_module.torch, "save", real_save)
    assert load_checkpoint(run / "last.pt").epoch == 1
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert load_checkpoint(run / "last.pt").epoch == 2


def test_unreadable_checkpoints_and_outputs_are_named(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tiny_run / "best.pt").read_bytes()[:1000])
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)
    # Text torch's unpickler reads as opcodes it then fails on with a KeyError or an IndexError.
    opcodes = []
    for i, content in enumerate(("hello world\n", "hi", "(")):
        opcodes.append(tmp_path / f"opcodes-{i}.pt")
        opcodes[-1].write_text(content)
    for path in (truncated, text, foreign, *opcodes):
        assert main(["evaluate", "--checkpoint", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"error: {path}: not a checkpoint" in err and "Traceback" not in err
        assert "weights_only=False" not in err  # torch's advice to load the file unsafely is not passed on
    # From a version with settings this one lacks: named, not a TypeError from the config's constructor.
    later = tmp_path / "later.pt"
    raw = torch.load(tiny_run / "best.pt", weights_only=True)
    torch.save({**raw, "config": {**raw["config"], "norm": "layer"}}, later)
    export = ["export", "--checkpoint", str(later), "--out", str(tmp_path / "model")]
    for command in (["evaluate", "--checkpoint", str(later)], export):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert (
            f"error: {later}: written by another version of this package: its config has norm, which this "
            "version does not know"
        ) in err and "Traceback" not in err
    assert main(["evaluate", "--checkpoint", str(tiny_run)]) == 2
    assert f"error: {tiny_run}: is a directory; name a checkpoint file in it" in capsys.readouterr().err
    occupied = tmp_path / "file"
    occupied.write_text("")
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(occupied)]) == 2
    assert f"{occupied}: exists and is not a directory" in capsys.readouterr().err
    assert main(["train", "--out", str(occupied), "--epochs", "1", *QUICK]) == 2
    assert f"{occupied}: exists and is not a directory" in capsys.readouterr().err
    # Under a file: a one-line error, and export says so before any of its work.
    under = occupied / "sub"
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(under)]) == 2
    assert f"{occupied}: is not a directory, so {under} cannot be made in it" in capsys.readouterr().err
    assert main(["train", "--out", str(under), "--epochs", "1", *QUICK]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Not a directory" in err and "Traceback" not in err


def test_evaluate_and_export_refuse_data_that_changed_since_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(20):
        Image.new("L", (8, 8), 10 * i).save(data / f"{i:02}.png")
    run = tmp_path / "run"
    folder = ["--dataset", "folder", "--data-dir", str(data), "--image-size", "8"]
    assert main(["train", "--out", str(run), "--epochs", "1", *folder, *QUICK]) == 0
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--iwae-samples", "2"]) == 0
    capsys.readouterr()
    Image.new("L", (8, 8), 255).save(data / "20.png")  # the split now draws differently
    for argv in (
        ["evaluate", "--checkpoint", str(run / "best.pt")],
        ["export", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "model")],
        ["train", "--out", str(run), "--resume", "--epochs", "2"],
    ):
        assert main(argv) == 2
        assert "the images differ from those" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_a_relative_data_dir_not_found_says_where_it_was_looked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    for i in range(20):
        Image.new("L", (8, 8), 10 * i).save(tmp_path / "data" / f"{i:02}.png")
    monkeypatch.chdir(tmp_path)
    folder = ["--dataset", "folder", "--data-dir", "data", "--image-size", "8"]
    assert main(["train", "--out", "run", "--epochs", "1", *folder, *QUICK]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"data: not found from {elsewhere}; the run was trained with this relative --data-dir: "
            "run this from the directory it was trained in"
        )
    )

    def resume(epochs: int, *flags: str) -> int:
        return main(["train", "--out", str(tmp_path / "run"), "--resume", "--epochs", str(epochs), *flags])

    assert resume(2) == 2
    advice = "(or resume it with --data-dir where the images are now)"
    assert capsys.readouterr().err.strip().endswith(f"run this from the directory it was trained in {advice}")
    # The same images, named another way or moved: resumed (their SHA-256 says they are the run's).
    assert resume(2, "--data-dir", str(tmp_path / "data")) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt").train_config["data_dir"] == str(tmp_path / "data")
    (tmp_path / "data").rename(elsewhere / "moved")
    assert resume(3, "--data-dir", "moved") == 0
    # A --data-dir given that is not there is named as given.
    assert resume(4, "--data-dir", "typo") == 2
    assert capsys.readouterr().err.strip().endswith("\nerror: typo: image folder not found")
    # Other images are not the run's data.
    Image.new("L", (8, 8), 255).save(elsewhere / "moved" / "00.png")
    assert resume(4, "--data-dir", "moved") == 2
    assert "the images differ from those this checkpoint was trained on" in capsys.readouterr().err
    # A checkpoint of a version that recorded no SHA-256 of its data: nothing to check other images against.
    last = tmp_path / "run" / "last.pt"
    torch.save({**torch.load(last, weights_only=True), "data_sha256": None}, last)
    assert resume(4, "--data-dir", str(elsewhere / "moved")) == 2
    assert "this checkpoint is of a version that did not record its data's SHA-256" in capsys.readouterr().err


def test_settings_a_new_run_may_not_take_still_load_from_an_earlier_versions_checkpoint(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lr past 1 became a refusal for new runs (1e38 overflowed in Adam); a checkpoint that holds one still
    evaluates and exports."""
    old = tmp_path / "old.pt"
    raw = torch.load(tiny_run / "best.pt", weights_only=True)
    torch.save({**raw, "train_config": {**raw["train_config"], "lr": 2.0}}, old)
    assert main(["evaluate", "--checkpoint", str(old), "--iwae-samples", "2"]) == 0
    assert (
        main(["export", "--checkpoint", str(old), "--out", str(tmp_path / "model"), "--iwae-samples", "2"])
        == 0
    )
    assert main(["train", "--out", str(tmp_path / "new"), "--lr", "2", *QUICK]) == 2
    assert "lr must be in (0, 1], got 2.0" in capsys.readouterr().err


def test_the_weight_average_warms_up_so_that_a_short_run_is_not_its_initial_weights(tmp_path: Path) -> None:
    """At a constant decay of 0.999, 85 % of the average after 164 steps was still the initial weights; the
    average warmed up as min(decay, (1 + n) / (10 + n)) keeps under a millionth of them."""
    update = train_module._ema_update(0.999)
    averaged = [torch.zeros(1)]  # the initial weights (AveragedModel copies them at its first update)
    for n in range(1, 164):
        update(averaged, [torch.ones(1)], torch.tensor(n))
    assert 1 - float(averaged[0]) < 1e-6
    # From about 9 000 updates on it is the plain exponential average.
    late = [torch.zeros(1)]
    update(late, [torch.ones(1)], torch.tensor(9000))
    assert float(late[0]) == pytest.approx(0.001)

    # What a 4-epoch run validates and exports: far from its initial weights, as its raw weights are.
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "4", "--seed", "2", *QUICK]) == 0
    last = load_checkpoint(run / "last.pt")
    torch.manual_seed(2)
    initial = VAE(VAEConfig(**last.config)).state_dict()
    assert last.raw_model is not None
    for name, weights in last.model.items():
        moved, raw_moved = (weights - initial[name]).norm(), (last.raw_model[name] - initial[name]).norm()
        assert moved > 0.8 * raw_moved, name


def test_resume_refuses_a_changed_setting_before_reading_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A changed --image-size was read into a whole folder at the new size, then refused as a model that
    expects 8x8 images; it is named as the setting that may not change, with nothing read."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(30):
        Image.fromarray(np.full((8, 8), i * 8, np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    data = ["--dataset", "folder", "--data-dir", str(folder), "--image-size", "8"]
    assert main(["train", "--out", str(run), "--epochs", "1", *data, *QUICK]) == 0
    calls: list[object] = []
    monkeypatch.setattr(train_module, "load_splits", lambda cfg: calls.append(cfg))
    argv = ["train", "--out", str(run), "--resume", "--epochs", "2", "--image-size", "12", "--no-progress"]
    assert main(argv) == 2
    assert "image_size 12 (the run's: 8)" in capsys.readouterr().err
    assert calls == []


def test_the_progress_bar_shows_the_loss_as_batches_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One bar over every batch of the run, its training loss a running mean of the epoch so far: on a large
    dataset an epoch is minutes, and a loss shown only at its end stands still for as long."""
    # Drawn at every update, not every 0.1 s: what the frames show does not depend on the machine's speed.
    monkeypatch.setattr(train_module, "tqdm", functools.partial(tqdm, mininterval=0, miniters=1))
    argv = ["train", "--out", str(tmp_path / "run"), "--epochs", "2", "--hidden", "8", "--latent-dim", "2"]
    assert main([*argv, "--warmup-epochs", "1", "--batch-size", "256"]) == 0
    steps = math.ceil(len(load_splits(TrainConfig()).train.images) / 256)
    frames = re.split(r"[\r\n]", capsys.readouterr().err)
    during_first = [f for f in frames if re.search(rf"\| 1/{2 * steps} ", f)]
    assert during_first and all("epoch 1/2" in f and re.search(r"train=\d+\.\d\d", f) for f in during_first)
    last = next(f for f in reversed(frames) if f"{2 * steps}/{2 * steps}" in f)
    assert "epoch 2/2" in last and re.search(r"val=\d+\.\d\d", last) and "best=" in last, last
