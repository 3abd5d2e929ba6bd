"""Training: negative ELBO with beta, linear KL warm-up and free bits; best checkpoint kept; resumable."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from training.data import DatasetName, Split, load_dataset, split_dataset
from training.model import VAE, VAEConfig

__all__ = ["Checkpoint", "TrainConfig", "load_checkpoint", "load_splits", "objective", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Data and optimisation settings of a run; saved in every checkpoint."""

    dataset: DatasetName = "digits"  # digits (embedded), idx or folder
    data_dir: str | None = None  # directory for idx / folder datasets
    image_size: int = 28  # folder: images are resized to image_size x image_size
    channels: int = 1  # folder: 1 (grayscale) or 3 (RGB)
    foreground: Literal["light", "dark"] = "light"  # polarity of the strokes in the training images
    seed: int = 0  # seeds the split, the initialisation, the batches and the sampling
    val_fraction: float = 0.1  # share of the images held out for per-epoch validation
    test_fraction: float = 0.2  # share held out for the test metrics (unless the dataset has a test part)
    epochs: int = 300  # passes over the training split
    batch_size: int = 32  # images per optimisation step
    lr: float = 2e-3  # Adam learning rate (peak, when the schedule is cosine)
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine decays to lr_min_ratio * lr
    lr_min_ratio: float = 0.02
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    beta: float = 1.0  # weight of the KL term (1 = the true ELBO)
    warmup_epochs: float = 10.0  # KL weight rises linearly from 0 to beta over this many epochs
    free_bits: float = 0.0  # per-dimension floor on the batch-mean KL, in nats (Kingma et al. 2016)
    ema_decay: float = 0.999  # exponential moving average of the weights, evaluated and exported; 0 = off
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default


@dataclass
class Checkpoint:
    """What a checkpoint file holds: enough to rebuild, evaluate, export or resume a run."""

    model: dict[str, Tensor]
    config: dict[str, Any]
    train_config: dict[str, Any]
    epoch: int
    best_val: float
    history: list[dict[str, float]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    generator: Tensor | None = None
    raw_model: dict[str, Tensor] | None = None  # the optimised weights when `model` holds their average
    ema_updates: int | None = None

    def build(self) -> VAE:
        """The model in eval mode, with the checkpoint's weights."""
        model = VAE(VAEConfig(**self.config))
        model.load_state_dict(self.model)
        return model.eval()

    @property
    def train_cfg(self) -> TrainConfig:
        return TrainConfig(**self.train_config)


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return Checkpoint(**raw)


def load_splits(cfg: TrainConfig) -> tuple[Split, Split, Split, str]:
    """(train, val, test, source) exactly as the run with this config saw them."""
    dataset = load_dataset(
        cfg.dataset,
        Path(cfg.data_dir) if cfg.data_dir else None,
        image_size=cfg.image_size,
        channels=cfg.channels,
    )
    train, val, test = split_dataset(
        dataset, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction
    )
    return train, val, test, dataset.source


def objective(recon: Tensor, kl: Tensor, beta: float, free_bits: float) -> Tensor:
    """Mean over the batch of recon + beta * KL, the KL of each dimension floored at `free_bits`."""
    kl_per_dim = kl.mean(0)  # (B, D) -> (D,)
    if free_bits > 0:
        kl_per_dim = kl_per_dim.clamp(min=free_bits)
    return recon.mean() + beta * kl_per_dim.sum()


@torch.no_grad()
def _validate(
    model: VAE, images: Tensor, generator: torch.Generator, batch_size: int = 512
) -> dict[str, float]:
    """One-sample negative ELBO on a split, nats per image."""
    model.eval()
    recon_sum, kl_sum = 0.0, 0.0
    for start in range(0, len(images), batch_size):
        recon, kl, _ = model(images[start : start + batch_size], generator)
        recon_sum += float(recon.sum())
        kl_sum += float(kl.sum())
    model.train()
    n = len(images)
    return {"neg_elbo": (recon_sum + kl_sum) / n, "reconstruction": recon_sum / n, "kl": kl_sum / n}


def train(
    model_cfg: VAEConfig, cfg: TrainConfig, out: Path, *, resume: bool = False, progress: bool = True
) -> Path:
    """Train and write `last.pt` (every epoch) and `best.pt` (best validation loss) to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_split, val_split, _, source = load_splits(cfg)
    c, h, w = train_split.images.shape[1:]
    if (model_cfg.channels, model_cfg.height, model_cfg.width) != (c, h, w):
        raise ValueError(
            f"model expects {model_cfg.channels}x{model_cfg.height}x{model_cfg.width} images, "
            f"dataset {source} has {c}x{h}x{w}"
        )
    x_train = torch.from_numpy(train_split.images)
    x_val = torch.from_numpy(val_split.images)

    model = VAE(model_cfg)
    # The averaged weights are the ones validated, checkpointed and exported.
    ema = None
    if cfg.ema_decay:
        average = get_ema_multi_avg_fn(cfg.ema_decay)  # type: ignore[no-untyped-call]
        ema = AveragedModel(model, multi_avg_fn=average)
    served = cast(VAE, ema.module) if ema is not None else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.lr_schedule == "cosine":
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total_steps, eta_min=cfg.lr * cfg.lr_min_ratio
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    val_generator_seed = cfg.seed + 1
    start_epoch, best_val, history = 0, math.inf, []

    if resume:
        ckpt = load_checkpoint(out / "last.pt")
        if ckpt.config != asdict(model_cfg):
            raise ValueError(f"{out / 'last.pt'}: model config differs from the one asked for")
        served.load_state_dict(ckpt.model)
        if ckpt.raw_model is not None:
            model.load_state_dict(ckpt.raw_model)
        if ema is not None and ckpt.ema_updates is not None:
            ema.n_averaged.fill_(ckpt.ema_updates)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
        if ckpt.scheduler is not None:
            scheduler.load_state_dict(ckpt.scheduler)
            if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                scheduler.T_max = total_steps  # --epochs may have grown since the checkpoint
        if ckpt.generator is not None:
            generator.set_state(ckpt.generator)
        start_epoch, best_val, history = ckpt.epoch, ckpt.best_val, ckpt.history
        log.info("resumed %s at epoch %d (best validation %.3f)", out / "last.pt", start_epoch, best_val)

    model.train()
    epochs = tqdm(range(start_epoch, cfg.epochs), desc="train", unit="epoch", disable=not progress)
    for epoch in epochs:
        started = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator)
        totals = np.zeros(3)
        for step in range(steps_per_epoch):
            progress_epochs = epoch + step / steps_per_epoch
            beta = cfg.beta * min(1.0, progress_epochs / cfg.warmup_epochs) if cfg.warmup_epochs else cfg.beta
            batch = x_train[order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            recon, kl, _ = model(batch, generator)
            loss = objective(recon, kl, beta, cfg.free_bits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            scheduler.step()
            recon_sum, kl_sum = float(recon.detach().sum()), float(kl.detach().sum())
            totals += np.array([recon_sum + kl_sum, recon_sum, kl_sum])
        train_metrics = totals / len(x_train)
        val = _validate(served, x_val, torch.Generator().manual_seed(val_generator_seed))
        row = {
            "epoch": epoch + 1,
            "train_neg_elbo": float(train_metrics[0]),
            "train_reconstruction": float(train_metrics[1]),
            "train_kl": float(train_metrics[2]),
            "val_neg_elbo": val["neg_elbo"],
            "val_reconstruction": val["reconstruction"],
            "val_kl": val["kl"],
            "lr": float(scheduler.get_last_lr()[0]),
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        epochs.set_postfix(
            train=f"{row['train_neg_elbo']:.2f}", val=f"{val['neg_elbo']:.2f}", best=f"{best_val:.2f}"
        )
        state = {
            "model": served.state_dict(),
            "config": asdict(model_cfg),
            "train_config": asdict(cfg),
            "epoch": epoch + 1,
            "history": history,
        }
        # Only count as best once the KL weight has reached beta: earlier losses are not comparable.
        if val["neg_elbo"] < best_val and epoch + 1 >= cfg.warmup_epochs:
            best_val = val["neg_elbo"]
            torch.save({**state, "best_val": best_val}, out / "best.pt")
        torch.save(
            {
                **state,
                "best_val": best_val,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "raw_model": model.state_dict() if ema is not None else None,
                "ema_updates": int(ema.n_averaged) if ema is not None else None,
            },
            out / "last.pt",
        )
    # The best checkpoint carries the whole run's history, for the loss-curve plot.
    # Fewer epochs than the warm-up: the last checkpoint is the best there is.
    best_source = out / "best.pt" if (out / "best.pt").exists() else out / "last.pt"
    best = torch.load(best_source, weights_only=True)
    for key in ("optimizer", "scheduler", "generator", "raw_model", "ema_updates"):
        best.pop(key, None)
    torch.save({**best, "history": history}, out / "best.pt")
    return out / "best.pt"
