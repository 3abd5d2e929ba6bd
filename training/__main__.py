"""Command line: `python -m training {train,evaluate,export} ...` (also installed as `vae-train`).

python -m training train --out runs/default                 # the default recipe on digits
python -m training evaluate --checkpoint runs/default/best.pt
python -m training export --checkpoint runs/default/best.pt --out models/default
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

import torch

from training.data import DataError, idx_test_file

if TYPE_CHECKING:
    from training.train import TrainConfig

__all__ = ["main"]


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type[Any], skip: set[str]) -> None:
    """One --option per field of a config dataclass, choices from its Literal type, the field's default in
    its help. Options not given stay out of the namespace: a resumed run takes those from its checkpoint."""
    defaults = cls()
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"(default: {default})"}
        if get_origin(hints[f.name]) is Literal:
            parser.add_argument(flag, choices=get_args(hints[f.name]), **kwargs)
        elif isinstance(default, list):
            parser.add_argument(flag, type=int, nargs="+", **kwargs)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif default is None:
            parser.add_argument(flag, **kwargs)
        else:
            parser.add_argument(flag, type=type(default), **kwargs)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _refuse_idle_flags(
    given: dict[str, Any], cfg: TrainConfig, model: dict[str, Any], architecture: str
) -> None:
    """ValueError for a flag that would do nothing: a mistake on the command line. (Not a check of the config
    itself: a checkpoint of an earlier version, which ignored it, may hold one and still loads.)"""
    if "hidden" in model and architecture != "mlp":
        raise ValueError(
            f"--hidden sizes the mlp's layers; {architecture} takes --conv-channels and --conv-dense"
        )
    for name in ("conv_channels", "conv_dense"):
        if name in model and architecture != "conv":
            raise ValueError(f"--{name.replace('_', '-')} is for the conv architecture; mlp takes --hidden")
    if "lr_min_ratio" in given and cfg.lr_schedule != "cosine":
        raise ValueError(
            "--lr-min-ratio is where the cosine schedule ends; --lr-schedule constant keeps --lr"
        )
    if "threads" in given and cfg.threads > (os.cpu_count() or 1):
        raise ValueError(
            f"--threads {cfg.threads} is more than this machine's {os.cpu_count()} CPUs "
            "(--threads 0 takes torch's default)"
        )
    own_test = idx_test_file(Path(cfg.data_dir)) if cfg.dataset == "idx" and cfg.data_dir else None
    if "test_fraction" in given and own_test is not None:
        raise ValueError(
            f"--test-fraction holds out part of the training images as the test set; {cfg.data_dir} has "
            f"test images of its own ({own_test}), which are the test set"
        )
    if "data_dir" in given and cfg.dataset == "digits":
        raise ValueError("--data-dir is for the idx and folder datasets; digits is embedded")
    for name in ("image_size", "channels"):
        if name in given and cfg.dataset != "folder":
            raise ValueError(
                f"--{name.replace('_', '-')} is for the folder dataset; {cfg.dataset} images keep their own "
                "size and channels"
            )
    if "foreground" in given and cfg.dataset == "digits":
        raise ValueError("--foreground describes idx and folder images; digits are light strokes on dark")


def _parser() -> argparse.ArgumentParser:
    from training.model import VAEConfig
    from training.train import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a VAE; writes best.pt and last.pt to --out")
    train.add_argument("--out", type=Path, required=True, help="run directory for checkpoints")
    train.add_argument("--resume", action="store_true", help="continue from --out/last.pt")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument(
        "--backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="torchrun process group (auto: nccl on GPUs)",
    )
    train.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when there is a GPU for every process on this machine",
    )
    _add_dataclass_options(train, TrainConfig, skip=set())
    # The image shape comes from the data, so the model always fits it.
    _add_dataclass_options(train, VAEConfig, skip={"channels", "height", "width"})

    evaluate = commands.add_parser("evaluate", help="test-split metrics of a checkpoint, as JSON")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--iwae-samples", type=_positive_int, default=1000, help="k of the IWAE estimate")

    export = commands.add_parser("export", help="ONNX encoder + decoder + model.json + plots")
    export.add_argument("--checkpoint", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True, help="model directory to write")
    export.add_argument("--name", help="model name in the card (default: vae-<dataset>-<architecture>)")
    export.add_argument("--iwae-samples", type=_positive_int, default=1000, help="k of the IWAE estimate")
    return parser


def _run(args: argparse.Namespace) -> None:
    from training.distributed import launched_rank
    from training.evaluate import evaluate
    from training.export import export
    from training.model import VAEConfig
    from training.train import TrainConfig, load_checkpoint, load_splits, train

    if args.command == "train":
        given = vars(args)
        train_given = {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given}
        # The model's own options: its image shape comes from the data (`channels` is the folder's option).
        shape = {"channels", "height", "width"}
        model_given = {
            f.name: given[f.name] for f in fields(VAEConfig) if f.name in given and f.name not in shape
        }
        splits = None
        if args.resume:
            # The run's own settings, with what was given on top; `train` refuses what may not change.
            ckpt = load_checkpoint(args.out / "last.pt")
            tcfg = TrainConfig(**{**ckpt.train_config, **train_given})
            mcfg = VAEConfig(**{**ckpt.config, **model_given})
            _refuse_idle_flags(train_given, tcfg, model_given, mcfg.architecture)
        else:
            tcfg = TrainConfig(**train_given)
            tcfg.check_new_run()
            # The image shape comes from the data; `train` uses the splits read for it.
            architecture = model_given.get("architecture", VAEConfig.architecture)
            _refuse_idle_flags(train_given, tcfg, model_given, architecture)
            splits = load_splits(tcfg)
            _, c, h, w = splits.train.images.shape
            mcfg = VAEConfig(channels=c, height=h, width=w, **model_given)
        best = train(
            mcfg,
            tcfg,
            args.out,
            resume=args.resume,
            progress=not args.no_progress,
            backend=args.backend,
            device=args.device,
            splits=splits,
        )
        if launched_rank() == 0:  # under torchrun every process returns here; one prints
            print(f"best checkpoint: {best}")
    elif args.command == "evaluate":
        ckpt = load_checkpoint(args.checkpoint)
        test = ckpt.splits().test
        metrics = evaluate(
            ckpt.build(), torch.from_numpy(test.images), k=args.iwae_samples, seed=ckpt.train_cfg.seed
        )
        print(json.dumps(metrics.as_dict(), indent=2))
    elif args.command == "export":
        card = export(args.checkpoint, args.out, name=args.name, iwae_samples=args.iwae_samples)
        print(json.dumps(card.metrics.model_dump(), indent=2))
        print(f"model written to {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    for chatty in ("onnxscript", "onnx_ir"):  # the exporter's optimiser narrates every pass
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        _run(args)
    except (DataError, OSError, ValueError) as error:  # OSError: FileNotFoundError, NotADirectoryError ...
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
