"""Training: negative ELBO with beta, linear KL warm-up and free bits; best checkpoint kept; resumable."""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DistributedSampler, TensorDataset
from tqdm import tqdm

from training.data import DataError, DatasetName, Split, load_dataset, split_dataset
from training.distributed import Backend, Context, distributed
from training.model import VAE, VAEConfig, check_choices

__all__ = [
    "MAX_SEED",
    "RESUMABLE",
    "Checkpoint",
    "TrainConfig",
    "load_checkpoint",
    "load_splits",
    "objective",
    "Splits",
    "train",
]

log = logging.getLogger(__name__)

# A module's parameters, as AveragedModel hands them to its update.
Params = tuple[Tensor, ...] | list[Tensor]
# Rank r draws its reparameterisation noise from seed + r * stride.
_RANK_SEED_STRIDE = 7919
# The largest seed: 2^32 - 1, leaving room for the offsets added to it (ranks, epochs) below torch's 2^64.
MAX_SEED = 2**32 - 1
# The largest side of a folder's images: a 1024 x 1024 image is a million inputs to the first layer already.
MAX_IMAGE_SIZE = 1024
# What `resume` may change in a run's TrainConfig; the rest of it, and the model, are the run's own.
# `data_dir` may name the run's images where they are now: they must still be the same (their SHA-256).
RESUMABLE = frozenset({"epochs", "threads", "data_dir"})


@dataclass
class TrainConfig:
    """Data and optimisation settings of a run; saved in every checkpoint."""

    dataset: DatasetName = "digits"  # digits (embedded), idx or folder
    data_dir: str | None = None  # directory for idx / folder datasets
    image_size: int = 28  # folder: images are resized to image_size x image_size (at most MAX_IMAGE_SIZE)
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

    def __post_init__(self) -> None:
        check_choices(self)
        for name, low in (("epochs", 1), ("batch_size", 1), ("image_size", 1), ("seed", 0), ("threads", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be at most {MAX_SEED}, got {self.seed}")
        for name in ("weight_decay", "beta", "warmup_epochs", "free_bits"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN fails too
                raise ValueError(f"{name} must be a finite number, 0 or more, got {getattr(self, name)}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number above 0, got {self.lr}")
        if not 0 < self.lr_min_ratio <= 1:
            raise ValueError(f"lr_min_ratio must be in (0, 1], got {self.lr_min_ratio}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 turns averaging off), got {self.ema_decay}")
        for name in ("val_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must leave images to train on, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )

    def check_new_run(self) -> None:
        """ValueError for settings a new run may not start with, though a checkpoint of an earlier version
        may hold them (it still loads): an lr past 1 (Adam's steps are about lr each; 1e38 overflows in it),
        an image_size past MAX_IMAGE_SIZE (a folder's images would not fit in memory)."""
        if self.lr > 1:
            raise ValueError(f"lr must be in (0, 1], got {self.lr}")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be at most {MAX_IMAGE_SIZE}, got {self.image_size}")


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
    generators: list[Tensor] | None = None  # each rank's noise generator state
    raw_model: dict[str, Tensor] | None = None  # the optimised weights when `model` holds their average
    ema_updates: int | None = None
    data_sha256: str | None = None  # the dataset's `sha256` (None in checkpoints of earlier versions)

    def build(self) -> VAE:
        """The model in eval mode, with the checkpoint's weights."""
        model = VAE(VAEConfig(**self.config))
        try:
            model.load_state_dict(self.model)
        except RuntimeError as error:  # missing, unexpected or misshapen tensors
            raise ValueError(f"the checkpoint's weights do not fit its model config: {error}") from error
        return model.eval()

    @property
    def train_cfg(self) -> TrainConfig:
        return TrainConfig(**self.train_config)

    def splits(self) -> Splits:
        """The splits as the run saw them; DataError if the data is no longer what it trained on."""
        _check_relative_data_dir(self.train_cfg)
        splits = load_splits(self.train_cfg)
        self.check_data(splits)
        return splits

    def check_data(self, splits: Splits) -> None:
        """DataError unless `splits` come from the data this checkpoint was trained on."""
        if self.data_sha256 not in (None, splits.sha256):
            raise DataError(
                f"{splits.source}: the images differ from those this checkpoint was trained on, so its test "
                "split would no longer be held out; restore them or train again"
            )


def load_checkpoint(path: Path) -> Checkpoint:
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; name a checkpoint file in it, such as {path / 'best.pt'}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # text, or a pickle of more than tensors and plain values
        # torch's own message suggests loading with weights_only=False: never for a file of unknown origin.
        raise ValueError(
            f"{path}: not a checkpoint this package can read (not a torch.save file of weights)"
        ) from error
    # Truncated, foreign, or bytes its unpickler reads as opcodes it then fails on (KeyError, IndexError):
    # whatever torch.load raises on a file is that the file is not a checkpoint.
    except Exception as error:
        reason = str(error).split("\n", 1)[0]
        raise ValueError(
            f"{path}: not a checkpoint this package can read ({type(error).__name__}: {reason})"
        ) from error
    known = {f.name for f in fields(Checkpoint)}
    required = {f.name for f in fields(Checkpoint) if f.default is MISSING and f.default_factory is MISSING}
    if not isinstance(raw, dict) or not required <= raw.keys() <= known:
        raise ValueError(f"{path}: not a checkpoint written by `python -m training train`")
    for key, config in (("config", VAEConfig), ("train_config", TrainConfig)):
        if not isinstance(raw[key], dict):
            raise ValueError(f"{path}: not a checkpoint written by `python -m training train`")
        unknown = sorted(set(raw[key]) - {f.name for f in fields(config)})
        if unknown:  # settings a later version added; an earlier version's missing ones take their defaults
            raise ValueError(
                f"{path}: written by another version of this package: its {key} has {', '.join(unknown)}, "
                "which this version does not know"
            )
    return Checkpoint(**raw)


def _check_relative_data_dir(cfg: TrainConfig, *, resuming: bool = False) -> None:
    """DataError for a run's relative --data-dir that is not there from the working directory."""
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_absolute() and not Path(cfg.data_dir).exists():
        raise DataError(
            f"{cfg.data_dir}: not found from {Path.cwd()}; the run was trained with this relative "
            "--data-dir: run this from the directory it was trained in"
            + (" (or resume it with --data-dir where the images are now)" if resuming else "")
        )


class Splits(NamedTuple):
    """A run's data: its three splits, where they came from, and the dataset's `sha256`."""

    train: Split
    val: Split
    test: Split
    source: str
    sha256: str


def load_splits(cfg: TrainConfig) -> Splits:
    """The splits exactly as the run with this config saw them."""
    dataset = load_dataset(
        cfg.dataset,
        Path(cfg.data_dir) if cfg.data_dir else None,
        image_size=cfg.image_size,
        channels=cfg.channels,
        foreground=cfg.foreground,
    )
    train, val, test = split_dataset(
        dataset, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction
    )
    return Splits(train, val, test, dataset.source, dataset.sha256)


def objective(recon: Tensor, kl: Tensor, beta: float, free_bits: float, ctx: Context | None = None) -> Tensor:
    """Mean over the batch of recon + beta * KL, the KL of each dimension floored at `free_bits`.

    Under torchrun this process holds a share of the batch and DDP averages the shares' gradients: whether a
    dimension is at its floor is decided on the whole batch's mean KL (averaged over `ctx`'s ranks), so that
    it is on every share or none, and the step is the one a single process takes on the whole batch.
    """
    kl_per_dim = kl.mean(0)  # (B, D) -> (D,)
    if free_bits > 0:
        batch_kl = kl_per_dim.detach() if ctx is None else ctx.average(kl_per_dim.detach())
        # clamp(min=free_bits) of the whole batch's KL: its gradient where it is at or above the floor.
        kl_per_dim = torch.where(batch_kl >= free_bits, kl_per_dim, free_bits)
    return recon.mean() + beta * kl_per_dim.sum()


@torch.no_grad()
def _validate(model: VAE, images: Tensor, ctx: Context, seed: int, batch_size: int = 512) -> dict[str, float]:
    """One-sample negative ELBO on a split, nats per image; each rank takes its share of the images."""
    model.eval()
    generator = torch.Generator(device=ctx.device).manual_seed(seed + ctx.rank)
    shard = images[ctx.rank :: ctx.world_size]
    recon_sum, kl_sum = 0.0, 0.0
    for start in range(0, len(shard), batch_size):
        recon, kl = model(shard[start : start + batch_size], generator)
        recon_sum += float(recon.sum())
        kl_sum += float(kl.sum())
    model.train()
    recon_sum, kl_sum = ctx.sum([recon_sum, kl_sum])
    n = len(images)
    return {"neg_elbo": (recon_sum + kl_sum) / n, "reconstruction": recon_sum / n, "kl": kl_sum / n}


def train(
    model_cfg: VAEConfig,
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    backend: Backend = "auto",
    device: str = "auto",
    splits: Splits | None = None,
) -> Path:
    """Train and write `last.pt` (every epoch) and `best.pt` (best validation loss) to `out`.

    `splits` are `load_splits(cfg)` when the caller has them already (the CLI reads the image shape from
    them); otherwise they are loaded here.

    Under torchrun every process runs this; the model is wrapped in DistributedDataParallel, each rank
    trains on its own shard of every epoch with `batch_size / world_size` images per step (so the total
    batch stays `batch_size`), metrics are summed over ranks, and rank 0 alone writes.
    """
    with distributed(backend, device) as ctx:
        return _train(model_cfg, cfg, out, ctx, resume=resume, progress=progress, splits=splits)


def _build(model_cfg: VAEConfig, device: torch.device) -> VAE:
    """The model on `device`, or a ValueError naming its sizes when its weights cannot be allocated there
    (`--hidden 5000000` for `--hidden 500`): torch's allocators fail with a RuntimeError and a traceback."""
    try:
        return VAE(model_cfg).to(device)
    except (MemoryError, RuntimeError) as error:
        out_of_memory = isinstance(error, (MemoryError, torch.OutOfMemoryError))
        if not (out_of_memory or "can't allocate memory" in str(error)):  # the CPU allocator's words
            raise
        if model_cfg.architecture == "mlp":
            sizes = f"--hidden {' '.join(map(str, model_cfg.hidden))}"
        else:
            channels = " ".join(map(str, model_cfg.conv_channels))
            sizes = f"--conv-channels {channels} --conv-dense {model_cfg.conv_dense}"
        raise ValueError(
            f"the model's weights do not fit in {device.type} memory with {sizes} and --latent-dim "
            f"{model_cfg.latent_dim} ({str(error).splitlines()[0]})"
        ) from None


def _train(
    model_cfg: VAEConfig,
    cfg: TrainConfig,
    out: Path,
    ctx: Context,
    *,
    resume: bool,
    progress: bool,
    splits: Splits | None,
) -> Path:
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {ctx.world_size} processes")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory (--out names the run's directory)")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    ckpt = load_checkpoint(out / "last.pt") if resume else None
    if ckpt is None:
        cfg.check_new_run()
    else:  # before the data is read: a changed setting may change what is read
        _check_resumable(out / "last.pt", ckpt, model_cfg, cfg)
        if splits is None and cfg.data_dir == ckpt.train_config.get("data_dir"):
            # --data-dir elsewhere is advice only where the images' SHA-256 can show they are the run's.
            _check_relative_data_dir(cfg, resuming=ckpt.data_sha256 is not None)
    if splits is None:
        splits = load_splits(cfg)
    train_split, val_split, _, source, data_sha256 = splits
    c, h, w = train_split.images.shape[1:]
    if (model_cfg.channels, model_cfg.height, model_cfg.width) != (c, h, w):
        raise ValueError(
            f"model expects {model_cfg.channels}x{model_cfg.height}x{model_cfg.width} images, "
            f"dataset {source} has {c}x{h}x{w}"
        )
    x_train = torch.from_numpy(train_split.images).to(ctx.device)
    x_val = torch.from_numpy(val_split.images).to(ctx.device)
    # Every rank draws its own shard of a shuffle that depends only on (seed, epoch).
    sampler: DistributedSampler[Any] = DistributedSampler(
        TensorDataset(x_train), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed
    )
    rank_batch = cfg.batch_size // ctx.world_size

    model = _build(model_cfg, ctx.device)
    trained: nn.Module = model if ctx.world_size == 1 else DistributedDataParallel(model)
    # The averaged weights are the ones validated, checkpointed and exported.
    ema = None
    if cfg.ema_decay:
        ema = AveragedModel(model, multi_avg_fn=_ema_update(cfg.ema_decay))
    served = cast(VAE, ema.module) if ema is not None else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(sampler) / rank_batch)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.lr_schedule == "cosine":
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total_steps, eta_min=cfg.lr * cfg.lr_min_ratio
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    # Each rank draws its own noise for the reparameterisation.
    generator = torch.Generator(device=ctx.device).manual_seed(cfg.seed + _RANK_SEED_STRIDE * ctx.rank)
    start_epoch, best_val, history = 0, math.inf, []

    if ckpt is not None:
        ckpt.check_data(splits)
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
                _stretch_cosine(scheduler, optimizer, total_steps)
        if ckpt.generators is not None and len(ckpt.generators) == ctx.world_size:
            generator.set_state(ckpt.generators[ctx.rank])
        elif ctx.is_main:
            log.warning("%s was written by a run of another size: noise draws start afresh", out / "last.pt")
        start_epoch, best_val, history = ckpt.epoch, ckpt.best_val, ckpt.history
        if ctx.is_main:
            log.info("resumed %s at epoch %d (best validation %.3f)", out / "last.pt", start_epoch, best_val)

    elif ctx.is_main:
        if (out / "last.pt").exists():
            log.warning("%s holds a run already: starting afresh over it (--resume continues it)", out)
        # Neither may be left from the earlier run: a run of fewer epochs than the warm-up writes no best.pt,
        # one that diverges in its first epoch no last.pt (and --resume or evaluate would read the old one).
        for name in ("best.pt", "last.pt"):
            (out / name).unlink(missing_ok=True)

    model.train()
    # One bar over every batch of the run, the epoch in its description: the training loss moves as batches
    # go (a running mean of the epoch so far; under torchrun, of rank 0's share until the epoch ends),
    # validation and best as epochs end.
    bar = tqdm(
        total=(cfg.epochs - start_epoch) * steps_per_epoch,
        desc="train",
        unit="batch",
        disable=not (progress and ctx.is_main),
    )
    shown_val, shown_best = "-", f"{best_val:.2f}"  # f"{inf:.2f}" is "inf"
    for epoch in range(start_epoch, cfg.epochs):
        bar.set_description(f"train, epoch {epoch + 1}/{cfg.epochs}", refresh=False)
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=ctx.device)
        totals = [0.0, 0.0, 0.0]  # recon, KL, images
        for step in range(steps_per_epoch):
            progress_epochs = epoch + step / steps_per_epoch
            beta = cfg.beta * min(1.0, progress_epochs / cfg.warmup_epochs) if cfg.warmup_epochs else cfg.beta
            batch = x_train[order[step * rank_batch : (step + 1) * rank_batch]]
            recon, kl = trained(batch, generator)
            loss = objective(recon, kl, beta, cfg.free_bits, ctx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            scheduler.step()
            totals[0] += float(recon.detach().sum())
            totals[1] += float(kl.detach().sum())
            totals[2] += len(batch)
            running = (totals[0] + totals[1]) / totals[2]
            bar.set_postfix(train=f"{running:.2f}", val=shown_val, best=shown_best, refresh=False)
            bar.update()
        recon_sum, kl_sum, seen = ctx.sum(totals)
        if not math.isfinite(recon_sum + kl_sum):
            kept = f"{out / 'last.pt'} holds epoch {epoch}" if epoch > 0 else "no checkpoint was written"
            raise ValueError(
                f"the training loss became {recon_sum + kl_sum} in epoch {epoch + 1}: the run diverged "
                f"(a lower --lr may help); {kept}"
            )
        val = _validate(served, x_val, ctx, seed=cfg.seed + 1)
        row = {
            "epoch": epoch + 1,
            "train_neg_elbo": (recon_sum + kl_sum) / seen,
            "train_reconstruction": recon_sum / seen,
            "train_kl": kl_sum / seen,
            "val_neg_elbo": val["neg_elbo"],
            "val_reconstruction": val["reconstruction"],
            "val_kl": val["kl"],
            "lr": float(scheduler.get_last_lr()[0]),
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        generators = ctx.gather(generator.get_state())
        # Only count as best once the KL weight has reached beta: earlier losses are not comparable.
        improved = val["neg_elbo"] < best_val and epoch + 1 >= cfg.warmup_epochs
        best_val = val["neg_elbo"] if improved else best_val
        shown_val, shown_best = f"{val['neg_elbo']:.2f}", f"{best_val:.2f}"
        bar.set_postfix(train=f"{row['train_neg_elbo']:.2f}", val=shown_val, best=shown_best)
        if ctx.is_main:
            state = {
                "model": _cpu(served.state_dict()),
                "config": asdict(model_cfg),
                "train_config": asdict(cfg),
                "epoch": epoch + 1,
                "history": history,
                "best_val": best_val,
                "data_sha256": data_sha256,
            }
            if improved:
                _save(state, out / "best.pt")
            training_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generators": generators,
                "raw_model": _cpu(model.state_dict()) if ema is not None else None,
                "ema_updates": int(ema.n_averaged) if ema is not None else None,
            }
            _save({**state, **training_state}, out / "last.pt")
    bar.close()
    if ctx.is_main:
        # The best checkpoint carries the whole run's history, for the loss-curve plot.
        # No epoch past the warm-up yet (in this run or the one it resumes): the last checkpoint is the best
        # there is, whatever best.pt an earlier part of the run left (a copy of its own last epoch).
        best_source = out / "best.pt" if math.isfinite(best_val) else out / "last.pt"
        best = torch.load(best_source, weights_only=True)
        for key in ("optimizer", "scheduler", "generators", "raw_model", "ema_updates"):
            best.pop(key, None)
        _save({**best, "history": history}, out / "best.pt")
    ctx.barrier()
    return out / "best.pt"


def _ema_update(decay: float) -> Callable[[Params, Params, Tensor | int], None]:
    """AveragedModel's update: an exponential moving average whose decay warms up, to
    min(decay, (1 + n) / (10 + n)) after n updates.

    At a constant 0.999 the first weights fade slowly: after 164 steps (4 epochs of a small run) 85 % of the
    average was still the initial weights, which were what got validated and exported. Warmed up, the average
    follows the last steps early on, and is the plain EMA from about 9 000 steps on.
    """

    def update(averaged: Params, current: Params, updates: Tensor | int) -> None:
        n = int(updates)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1 + n) / (10 + n)))

    return update


def _save(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file beside `path`, then renamed over it: a run stopped while saving leaves
    the previous checkpoint whole (and --resume able to read it), never half a file."""
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)


def _check_resumable(path: Path, ckpt: Checkpoint, model_cfg: VAEConfig, cfg: TrainConfig) -> None:
    """ValueError naming each setting that differs from the run's own, except those in RESUMABLE."""
    asked = {**asdict(model_cfg), **{k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}}
    own = {**ckpt.config, **{k: v for k, v in ckpt.train_config.items() if k not in RESUMABLE}}
    differ = [
        f"{name} {asked[name]!r} (the run's: {own.get(name)!r})"
        for name in asked
        if asked[name] != own.get(name)
    ]
    if differ:
        raise ValueError(
            f"{path}: a resumed run keeps its own settings, and these differ from them: {'; '.join(differ)} "
            f"(only {', '.join(sorted(RESUMABLE))} may change)"
        )
    if ckpt.data_sha256 is None and cfg.data_dir != ckpt.train_config.get("data_dir"):
        raise ValueError(
            f"{path}: --data-dir {cfg.data_dir} is not the run's ({ckpt.train_config.get('data_dir')}), and "
            "this checkpoint is of a version that did not record its data's SHA-256 to check them against: "
            "resume it without --data-dir, from the directory it was trained in"
        )
    if cfg.epochs <= ckpt.epoch:
        raise ValueError(
            f"{path}: the run has done {ckpt.epoch} epochs; ask for more with --epochs to resume it"
        )


def _stretch_cosine(
    scheduler: torch.optim.lr_scheduler.CosineAnnealingLR, optimizer: torch.optim.Optimizer, total_steps: int
) -> None:
    """Fit a resumed cosine schedule to `total_steps` when the number of epochs has changed.

    CosineAnnealingLR steps by a recurrence from the current rate; from the end of a finished schedule (its
    minimum) that recurrence stays at the minimum, so the rate is set to the new schedule's at this step.
    """
    if scheduler.T_max == total_steps:
        return  # the same schedule: resumed bit for bit
    scheduler.T_max = total_steps
    step = scheduler.last_epoch
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        eta_min = scheduler.eta_min
        group["lr"] = eta_min + (base - eta_min) * (1 + math.cos(math.pi * step / total_steps)) / 2


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict on the CPU, so checkpoints load anywhere."""
    return {name: tensor.detach().cpu() for name, tensor in state.items()}
