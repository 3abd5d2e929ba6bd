"""Export a checkpoint to `encoder.onnx` + `decoder.onnx` + `model.json` (+ plots), parity-checked.

The encoder graph is x (N, C, H, W) -> (mu, logvar); the decoder graph is z (N, D) -> (x_mean, logits), the
Bernoulli means and their logits, each (N, C, H, W): float32 means round to 0 and 1 where the logits pass
about ±17, and -log p(x|z) is exact from the logits alone. Both have a dynamic batch axis and no
randomness. Nothing is written unless ONNX Runtime reproduces PyTorch at batch sizes 1, 2, 7 and 64.
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript
import torch
from torch import nn

from service.model_card import (
    CARD_FILE,
    DatasetInfo,
    InputSpec,
    ModelCard,
    OnnxFile,
    SplitInfo,
    TensorSpec,
    TestMetrics,
    sha256_file,
)
from training.evaluate import evaluate
from training.model import Decoder
from training.plots import write_plots
from training.train import Checkpoint, load_checkpoint

__all__ = [
    "OPSET",
    "PARITY_BATCHES",
    "PARITY_TOLERANCE",
    "DecoderGraph",
    "ExportError",
    "export",
    "export_module",
]

log = logging.getLogger(__name__)


def _not_torchvision(record: logging.LogRecord) -> bool:
    return "torchvision is not installed" not in record.getMessage()


# torch.onnx warns, at each export, of the torchvision operators it would register were torchvision
# installed: this model uses none of them.
logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_not_torchvision)

OPSET = 18
PARITY_BATCHES = (1, 2, 7, 64)
# Float32 through a few small matmuls: ONNX Runtime and PyTorch differ by a few ulps.
PARITY_TOLERANCE = 1e-5
# Outputs compared relative to their size beyond 1: logits reach tens, where float32's spacing alone is a few
# 1e-6, and the two runtimes' matrix products round differently by several of it. The others (the means in
# [0, 1], the posterior's parameters) are compared absolutely.
_RELATIVE = frozenset({"logits"})
# The batch the graph is traced with: >= 2, so the exporter cannot specialise the batch axis to 0/1.
_TRACE_BATCH = 3


class ExportError(ValueError):
    """The exported graph is not faithful to the PyTorch model: the checkpoint cannot be served as it is (the
    CLI says so, as it does of bad settings and data)."""


class DecoderGraph(Decoder):
    """What decoder.onnx computes: z (N, D) -> the Bernoulli means and their logits, each (N, C, H, W). A
    Decoder, so that the graph's weights keep the names of its state dict."""

    @classmethod
    def of(cls, decoder: Decoder) -> DecoderGraph:
        graph = cls(decoder.cfg)
        graph.load_state_dict(decoder.state_dict())
        return graph.eval()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = self.logits(z)
        return torch.sigmoid(logits), logits


def export_module(
    module: nn.Module, example: torch.Tensor, path: Path, inputs: list[str], outputs: list[str]
) -> None:
    """torch.onnx.export with a dynamic batch axis, weights embedded in the one file, then onnx.checker."""
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        # The exporter's own deprecation chatter (pytree internals); the output is checked below.
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes={inputs[0]: {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    graph = onnx.load(str(path))
    # The exporter annotates each node with the Python stack that made it: paths of this machine, no use
    # to the service, and they would make the bytes (and sha256) depend on where the export ran.
    for node in [*graph.graph.node, *(n for function in graph.functions for n in function.node)]:
        del node.metadata_props[:]
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))


def _parity(module: nn.Module, path: Path, make_input: torch.Tensor, label: str) -> float:
    """Max |PyTorch - ONNX Runtime| over every output and batch size; raises ExportError above tolerance."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    worst = 0.0
    for batch in PARITY_BATCHES:
        x = make_input[:batch]
        with torch.no_grad():
            expected = module(x)
        expected_list = list(expected) if isinstance(expected, tuple) else [expected]
        got = session.run(None, {input_name: x.numpy()})
        for name, want, have in zip([o.name for o in session.get_outputs()], expected_list, got, strict=True):
            if have.shape != tuple(want.shape):
                raise ExportError(
                    f"{label}: output {name} at batch {batch} has shape {have.shape}, not {want.shape}"
                )
            reference = want.numpy()
            diff = np.abs(have - reference)
            if name in _RELATIVE:
                diff /= np.maximum(1.0, np.abs(reference))
            error = float(np.max(diff))
            worst = max(worst, error)
            if not (np.isfinite(have).all() and torch.isfinite(want).all()):
                raise ExportError(f"{label}: output {name} at batch {batch} holds NaN or infinite values")
            if not error <= PARITY_TOLERANCE:  # NaN fails too
                scale = " of max(1, |value|)" if name in _RELATIVE else ""
                raise ExportError(
                    f"{label}: output {name} at batch {batch} differs from PyTorch by {error:.3g}{scale} "
                    f"(tolerance {PARITY_TOLERANCE})"
                )
    return worst


def _onnx_file(path: Path) -> OnnxFile:
    graph = onnx.load(str(path)).graph

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        dims = value.type.tensor_type.shape.dim
        return TensorSpec(
            name=value.name, shape=[d.dim_value if d.HasField("dim_value") else None for d in dims]
        )

    return OnnxFile(
        file=path.name,
        sha256=sha256_file(path),
        inputs=[spec(v) for v in graph.input],
        outputs=[spec(v) for v in graph.output],
    )


def export(checkpoint: Path, out: Path, *, name: str | None = None, iwae_samples: int = 1000) -> ModelCard:
    """Export, verify, evaluate on the test split and write the model directory `out`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory (--out names the model directory)")
    # Where the model directory will be made: refused now, not after the export, parity checks and plots.
    parent = next(path for path in out.absolute().parents if path.exists())
    if not parent.is_dir():
        raise ValueError(f"{parent}: is not a directory, so {out} cannot be made in it (--out)")
    ckpt: Checkpoint = load_checkpoint(checkpoint)
    model = ckpt.build()
    cfg, tcfg = model.cfg, ckpt.train_cfg
    train_split, val_split, test_split, source, _ = ckpt.splits()
    generator = torch.Generator().manual_seed(tcfg.seed)
    images = torch.rand((max(PARITY_BATCHES), cfg.channels, cfg.height, cfg.width), generator=generator)
    latents = 2.0 * torch.randn((max(PARITY_BATCHES), cfg.latent_dim), generator=generator)

    with tempfile.TemporaryDirectory(prefix="vae-export-") as tmp:
        staging = Path(tmp)
        export_module(model.encoder, images[:_TRACE_BATCH], staging / "encoder.onnx", ["x"], ["mu", "logvar"])
        decoder = DecoderGraph.of(model.decoder)
        export_module(decoder, latents[:_TRACE_BATCH], staging / "decoder.onnx", ["z"], ["x_mean", "logits"])
        worst = max(
            _parity(model.encoder, staging / "encoder.onnx", images, "encoder.onnx"),
            _parity(decoder, staging / "decoder.onnx", latents, "decoder.onnx"),
        )
        log.info("ONNX parity holds at batch sizes %s: max |diff| %.2e", PARITY_BATCHES, worst)

        metrics = evaluate(model, torch.from_numpy(test_split.images), k=iwae_samples, seed=tcfg.seed)
        log.info("test metrics: %s", metrics)
        card = ModelCard(
            name=name or f"vae-{tcfg.dataset}-{cfg.architecture}",
            created_at=datetime.now(UTC).replace(microsecond=0),
            architecture=cfg.architecture,
            input=InputSpec(
                channels=1 if cfg.channels == 1 else 3,
                height=cfg.height,
                width=cfg.width,
                foreground=tcfg.foreground,
            ),
            latent_dim=cfg.latent_dim,
            likelihood="bernoulli",
            logvar_range=(cfg.logvar_min, cfg.logvar_max),
            encoder=_onnx_file(staging / "encoder.onnx"),
            decoder=_onnx_file(staging / "decoder.onnx"),
            opset=OPSET,
            dataset=DatasetInfo(
                name=tcfg.dataset,
                source=source,
                split=SplitInfo(
                    seed=tcfg.seed,
                    train=len(train_split.images),
                    val=len(val_split.images),
                    test=len(test_split.images),
                ),
            ),
            # `epoch`: the epoch the exported weights are from (best.pt: the best validation loss);
            # `epochs_run`: how many the run did.
            training={
                "model": ckpt.config,
                "train": ckpt.train_config,
                "epoch": ckpt.epoch,
                "epochs_run": len(ckpt.history),
            },
            metrics=TestMetrics(**metrics.as_dict()),
            versions={
                "python": platform.python_version(),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxscript": onnxscript.__version__,
                "onnxruntime": ort.__version__,
            },
        )
        (staging / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
        write_plots(model, ckpt.history, test_split.images, test_split.labels, staging, seed=tcfg.seed)

        out.mkdir(parents=True, exist_ok=True)
        for path in sorted(staging.iterdir()):
            shutil.copy2(path, out / path.name)
    log.info("wrote %s", out)
    return card
