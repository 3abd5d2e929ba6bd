"""Command line: `python -m training {train,evaluate,export} ...` (also installed as `vae-train`).

python -m training train --out runs/default                 # the default recipe on digits
python -m training evaluate --checkpoint runs/default/best.pt
python -m training export --checkpoint runs/default/best.pt --out models/default
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from training.data import DATASETS, DataError

__all__ = ["main"]


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type[Any], skip: set[str]) -> None:
    """One --option per field of a config dataclass; the field's default is the option's default."""
    defaults = cls()
    for f in fields(cls):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, list):
            parser.add_argument(flag, type=int, nargs="+", default=default, help=f"(default: {default})")
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif default is None:
            parser.add_argument(flag, default=None)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"(default: {default})")


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
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available"
    )
    _add_dataclass_options(train, TrainConfig, skip={"dataset", "foreground"})
    train.add_argument("--dataset", choices=DATASETS, default="digits")
    train.add_argument("--foreground", choices=("light", "dark"), default="light")
    _add_dataclass_options(
        train, VAEConfig, skip={"channels", "height", "width", "architecture", "activation"}
    )
    train.add_argument("--architecture", choices=("mlp", "conv"), default="mlp")
    train.add_argument("--activation", choices=("relu", "elu", "silu"), default=VAEConfig().activation)

    evaluate = commands.add_parser("evaluate", help="test-split metrics of a checkpoint, as JSON")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--iwae-samples", type=int, default=1000, help="k of the IWAE estimate")

    export = commands.add_parser("export", help="ONNX encoder + decoder + model.json + plots")
    export.add_argument("--checkpoint", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True, help="model directory to write")
    export.add_argument("--name", help="model name in the card (default: vae-<dataset>-<architecture>)")
    export.add_argument("--iwae-samples", type=int, default=1000, help="k of the IWAE estimate")
    return parser


def _run(args: argparse.Namespace) -> None:
    from training.distributed import launched_rank
    from training.evaluate import evaluate
    from training.export import export
    from training.model import VAEConfig
    from training.train import TrainConfig, load_checkpoint, load_splits, train

    if args.command == "train":
        values = vars(args)
        tcfg = TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig)})
        # The image shape comes from the data, so the model always fits it.
        sample = load_splits(tcfg)[0].images
        _, c, h, w = sample.shape
        mcfg = VAEConfig(
            channels=c,
            height=h,
            width=w,
            **{
                f.name: values[f.name]
                for f in fields(VAEConfig)
                if f.name not in ("channels", "height", "width")
            },
        )
        best = train(
            mcfg,
            tcfg,
            args.out,
            resume=args.resume,
            progress=not args.no_progress,
            backend=args.backend,
            device=args.device,
        )
        if launched_rank() == 0:  # under torchrun every process returns here; one prints
            print(f"best checkpoint: {best}")
    elif args.command == "evaluate":
        ckpt = load_checkpoint(args.checkpoint)
        test = load_splits(ckpt.train_cfg)[2]
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
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
