"""ONNX Runtime: provider choice, session options, model-card checks, warm-up, and the model runs.

`load_model(settings)` is called once, in the app's lifespan; everything that could be wrong with the model
directory or the machine is found there, and reported as a `ModelError` naming the file and the field.
Every inference goes through `Model.run`, the one place that calls ONNX Runtime (batching hooks in here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.config import Settings
from service.model_card import ModelCard, OnnxFile, TensorSpec, load_card, sha256_file

__all__ = ["CUDA", "Floats", "Model", "ModelError", "load_model"]

# uvicorn's own logger, so that the provider line appears in `make serve` output next to its startup lines.
log = logging.getLogger("uvicorn.error")

CUDA = "CUDAExecutionProvider"
Floats = npt.NDArray[np.float32]
Graph = Literal["encoder", "decoder"]

# The fixed ONNX interface (training/export.py writes it; the card repeats it): input and output names.
_INTERFACE: dict[Graph, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "encoder": (("x",), ("mu", "logvar")),
    "decoder": (("z",), ("x_mean",)),
}
# Batch size of the warm-up run; 2 rather than 1 so a graph specialised to batch 1 fails here, not later.
_WARMUP_BATCH = 2


class ModelError(RuntimeError):
    """The model directory, the card, the ONNX files or the machine cannot serve; the message says why."""


@dataclass(frozen=True)
class Model:
    """A loaded, checked and warmed-up VAE: encoder and decoder sessions plus their model card."""

    card: ModelCard
    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    # Execution providers in use, in ONNX Runtime's order of preference; the first runs the graph.
    providers: tuple[str, ...]

    @property
    def provider(self) -> str:
        """The execution provider that runs the graphs."""
        return self.providers[0]

    @property
    def latent_dim(self) -> int:
        """Length D of a latent vector."""
        return self.card.latent_dim

    def run(self, graph: Graph, tensor: Floats) -> list[Floats]:
        """One ONNX Runtime run of `graph` on its single input; its outputs in the interface's order.

        Runs inline: a batch of this model takes microseconds, less than handing it to a thread.
        """
        session = self.encoder if graph == "encoder" else self.decoder
        (name,), outputs = _INTERFACE[graph]
        result: list[Floats] = session.run(list(outputs), {name: tensor})
        return result

    def encode(self, images: Floats) -> tuple[Floats, Floats]:
        """(N, C, H, W) images in [0, 1] -> (mu, logvar), each (N, D)."""
        low, high = self.card.input.pixel_range
        x = images if (low, high) == (0.0, 1.0) else low + images * (high - low)
        mu, logvar = self.run("encoder", np.ascontiguousarray(x, dtype=np.float32))
        return mu, logvar

    def decode(self, latents: npt.NDArray[np.floating]) -> Floats:
        """(N, D) latents -> (N, C, H, W) Bernoulli means in [0, 1]."""
        (x_mean,) = self.run("decoder", np.ascontiguousarray(latents, dtype=np.float32))
        return x_mean


def load_model(settings: Settings) -> Model:
    """Read and check the model card, open both graphs, check them against it, and warm them up."""
    model_dir = settings.model_dir
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: model directory not found")
    try:
        card = load_card(model_dir)
    except ValueError as error:
        raise ModelError(str(error)) from error
    _check_card(card)
    providers = _choose_providers(settings.providers)
    encoder = _open(model_dir, "encoder", card.encoder, settings, providers)
    decoder = _open(model_dir, "decoder", card.decoder, settings, providers)
    in_use = tuple(encoder.get_providers())
    if tuple(decoder.get_providers()) != in_use:
        raise ModelError(
            f"encoder runs on {', '.join(in_use)} but decoder on {', '.join(decoder.get_providers())}"
        )
    if settings.require_gpu and in_use[0] != CUDA:
        raise ModelError(
            f"VAE_REQUIRE_GPU=true but ONNX Runtime runs on {in_use[0]}, not {CUDA}: "
            f"CUDA is not active on this machine (requested {', '.join(settings.providers)}; "
            f"this onnxruntime build offers {', '.join(ort.get_available_providers())})"
        )
    model = Model(card=card, encoder=encoder, decoder=decoder, providers=in_use)
    _warm_up(model)
    fallback = f" ({CUDA} requested but not active)" if CUDA in providers and model.provider != CUDA else ""
    log.info(
        "model %r (%s, latent %d, input %s) running on %s%s",
        card.name,
        card.architecture,
        card.latent_dim,
        "x".join(map(str, card.input_shape)),
        model.provider,
        fallback,
    )
    return model


def _choose_providers(requested: list[str]) -> list[str]:
    """The requested providers that this onnxruntime build has, in the requested order."""
    available = set(ort.get_available_providers())
    chosen = [name for name in requested if name in available]
    skipped = [name for name in requested if name not in available]
    if skipped:
        log.info("execution providers not in this onnxruntime build, skipped: %s", ", ".join(skipped))
    if not chosen:
        raise ModelError(
            f"none of the execution providers {', '.join(requested)} is in this onnxruntime build "
            f"(it has {', '.join(sorted(available))})"
        )
    return chosen


def _session_options(settings: Settings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    # The graphs are chains of layers: nothing to gain from running operators side by side.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _open(
    model_dir: Path, graph: Graph, spec: OnnxFile, settings: Settings, providers: list[str]
) -> ort.InferenceSession:
    """Check the file's sha256, open a session on it and check its interface against the card."""
    path = model_dir / spec.file
    if not path.is_file():
        raise ModelError(f"{path}: not found (model.json {graph}.file)")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ModelError(f"{path}: sha256 is {digest} but model.json {graph}.sha256 says {spec.sha256}")
    try:
        session = ort.InferenceSession(
            str(path), sess_options=_session_options(settings), providers=providers
        )
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise ModelError(f"{path}: ONNX Runtime cannot load it ({error})") from error
    _check_tensors(path, f"{graph}.inputs", spec.inputs, session.get_inputs())
    _check_tensors(path, f"{graph}.outputs", spec.outputs, session.get_outputs())
    return session


def _check_tensors(path: Path, field: str, specs: list[TensorSpec], args: list[ort.NodeArg]) -> None:
    """The graph's inputs or outputs must be the card's: same count, names, shapes and dtype."""
    if len(specs) != len(args):
        raise ModelError(
            f"{path}: model.json {field} lists {len(specs)} tensors but the graph has {len(args)}"
        )
    for i, (spec, arg) in enumerate(zip(specs, args, strict=True)):
        where = f"{path}: model.json {field}[{i}]"
        if spec.name != arg.name:
            raise ModelError(f"{where}.name is {spec.name!r} but the graph has {arg.name!r}")
        # ONNX Runtime gives a dynamic axis as a name ("batch") or None; the card writes null.
        graph_shape = [dim if isinstance(dim, int) else None for dim in arg.shape]
        if spec.shape != graph_shape:
            raise ModelError(f"{where}.shape is {spec.shape} but the graph has {graph_shape}")
        if arg.type != "tensor(float)":
            raise ModelError(f"{where}.dtype is {spec.dtype} but the graph has {arg.type}")


def _check_card(card: ModelCard) -> None:
    """The card must describe the fixed interface, consistently with its own input spec and latent size."""
    image = [None, *card.input_shape]
    latent = [None, card.latent_dim]
    expected: dict[Graph, tuple[OnnxFile, list[list[int | None]], list[list[int | None]]]] = {
        "encoder": (card.encoder, [image], [latent, latent]),
        "decoder": (card.decoder, [latent], [image]),
    }
    for graph, (spec, input_shapes, output_shapes) in expected.items():
        input_names, output_names = _INTERFACE[graph]
        for field, tensors, names, shapes in (
            ("inputs", spec.inputs, input_names, input_shapes),
            ("outputs", spec.outputs, output_names, output_shapes),
        ):
            found = [tensor.name for tensor in tensors]
            if found != list(names):
                raise ModelError(
                    f"model.json {graph}.{field}: names are {found}, the interface needs {list(names)}"
                )
            for i, (tensor, shape) in enumerate(zip(tensors, shapes, strict=True)):
                if tensor.shape != shape:
                    size = "x".join(map(str, card.input_shape))
                    raise ModelError(
                        f"model.json {graph}.{field}[{i}].shape is {tensor.shape} but input {size} "
                        f"and latent_dim {card.latent_dim} make it {shape}"
                    )


def _warm_up(model: Model) -> None:
    """One run of each graph on zeros, checking the output shapes against the card."""
    c, h, w = model.card.input_shape
    d = model.latent_dim
    try:
        mu, logvar = model.encode(np.zeros((_WARMUP_BATCH, c, h, w), dtype=np.float32))
        x_mean = model.decode(np.zeros((_WARMUP_BATCH, d), dtype=np.float32))
    except Exception as error:  # an ONNX Runtime failure on the warm-up is a startup failure
        raise ModelError(f"warm-up run failed: {error}") from error
    for name, array, shape in (
        ("mu", mu, (_WARMUP_BATCH, d)),
        ("logvar", logvar, (_WARMUP_BATCH, d)),
        ("x_mean", x_mean, (_WARMUP_BATCH, c, h, w)),
    ):
        if array.shape != shape:
            raise ModelError(f"warm-up: {name} has shape {array.shape}, the model card implies {shape}")
