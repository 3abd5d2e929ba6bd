"""ONNX Runtime: provider choice, session options, model-card checks, warm-up, and the model runs.

`load_model(settings)` is called once, in the app's lifespan; everything that could be wrong with the model
directory or the machine is found there, and reported as a `ModelError` naming the file and the field.
Every inference goes through `Model.run`, the one place that calls ONNX Runtime. Routes await
`Model.encode_async` / `decode_async`: with batching on, a `Batcher` per graph coalesces the runs of
concurrent requests into one ONNX Runtime run on a thread of its own, so the event loop never runs the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.config import Settings
from service.logs import NativeLog, native_stderr
from service.model_card import ModelCard, OnnxFile, TensorSpec, load_card, sha256_file

__all__ = [
    "CUDA",
    "CUDA_OPTIONS",
    "Batcher",
    "Batching",
    "Floats",
    "Graph",
    "Model",
    "ModelError",
    "RunObserver",
    "SHUTDOWN_WAIT_S",
    "execution_providers",
    "load_model",
    "session_options",
]

# uvicorn's own logger, so that the provider line appears in `make serve` output next to its startup lines.
log = logging.getLogger("uvicorn.error")
# ONNX Runtime's own log lines, relayed from its stderr while the model loads.
native_log = logging.getLogger("onnxruntime")

CUDA = "CUDAExecutionProvider"
Floats = npt.NDArray[np.float32]
Graph = Literal["encoder", "decoder"]
# Told about every run: the graph, its batch size (rows) and the seconds ONNX Runtime took (for the metrics).
RunObserver = Callable[[Graph, int, float], None]

# The fixed ONNX interface (training/export.py writes it; the card repeats it): input and output names.
_INTERFACE: dict[Graph, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "encoder": (("x",), ("mu", "logvar")),
    "decoder": (("z",), ("x_mean", "logits")),
}
# Seconds the shutdown waits at most for each graph's runs still queued or in progress (`Model.close`).
CLOSE_WAIT_S = 5.0
# The most the app's shutdown waits in all, one batching thread a graph: an orchestrator's grace period
# covers it after the drain.
SHUTDOWN_WAIT_S = len(_INTERFACE) * CLOSE_WAIT_S
# The CUDA provider's options (ONNX Runtime's defaults otherwise), measured by bench/cuda.py. Full float32
# in matrix products: TF32 would round their inputs to 10 bits, putting CUDA's answers ~1e-3 from the
# CPU's (and batched ones as far from single ones). cuDNN picks a convolution algorithm by its heuristics
# instead of timing every algorithm: it does that at each new input shape, and batch sizes vary with the
# traffic; the first run at a new size then costs a few milliseconds on a conv model instead of 20-35.
CUDA_OPTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
)
# Batch size of the warm-up run; 2 rather than 1 so a graph specialised to batch 1 fails here, not later.
_WARMUP_BATCH = 2


class ModelError(RuntimeError):
    """The model directory, the card, the ONNX files or the machine cannot serve; the message says why."""


@dataclass(frozen=True)
class Batching:
    """How the runs of concurrent requests are coalesced (VAE_BATCH_MAX_SIZE, VAE_BATCH_MAX_DELAY_US)."""

    max_size: int  # most rows (images or latents) in one coalesced run; a larger request runs alone
    max_delay: float  # seconds the first request of a run may wait for others to join it


@dataclass
class _Pending:
    """One request's input waiting for a run, and the future (on the request's event loop) of its outputs."""

    tensor: Floats
    future: asyncio.Future[list[Floats]]
    loop: asyncio.AbstractEventLoop
    queued: float  # time.monotonic() when it was queued


# One request's outcome: its rows of each output, or the exception of its run.
_Outcome = tuple[_Pending, "list[Floats] | Exception"]
# While requests come one at a time, all but one in this many run inline; that one goes through the thread,
# where another request arriving before it is back shows that requests overlap again. Measured in-process:
# one in 32 cost sequential requests 2-5 %, more than the probes' round trips alone (likely the run on another
# core, away from the weights in cache); one in 256 costs nothing measurable and finds overlap soon enough.
_PROBE_EVERY = 256


class Batcher:
    """Coalesces the runs of one graph requested concurrently into one ONNX Runtime run, on its own thread.

    The thread takes the oldest queued request, adds those queued behind it (waiting up to `max_delay` after
    the oldest arrived) up to `max_size` rows, runs them as one batch and hands each request its own rows.
    When a coalesced run fails, its requests run again one by one, so a failing input fails only its own
    request. The thread starts with the first request and stops on `close()`.

    When requests come one at a time (none of the last `_PROBE_EVERY` found another one waiting for a run),
    there is nothing to coalesce and the event loop has nothing else to do: a request of at most `max_size`
    rows then runs inline, on the loop, which spares it the two thread wake-ups of the round trip (more than
    a small run takes). One in `_PROBE_EVERY` still goes through the thread; any request arriving while one
    is there switches back to the thread. Counters are kept on the event loop's thread (one loop per model).
    """

    def __init__(self, run: Callable[[Floats], list[Floats]], batching: Batching, name: str) -> None:
        self._run = run
        self._batching = batching
        self._name = name
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()  # None: stop
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._in_flight = 0  # requests queued or running on the thread
        self._alone = 0  # consecutive requests that found no other one in flight
        # When the thread's current run began (monotonic), while one is on.
        self._run_started: float | None = None

    async def __call__(self, tensor: Floats) -> list[Floats]:
        """The outputs of `run(tensor)`, computed within a coalesced run (or inline, see the class)."""
        if self._in_flight:
            self._alone = 0
        else:
            self._alone += 1
            sequential = self._alone > _PROBE_EVERY and self._alone % _PROBE_EVERY
            if sequential and len(tensor) <= self._batching.max_size and not self._closed:
                return self._run(tensor)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Floats]] = loop.create_future()
        with self._lock:  # so that nothing is queued behind the stop signal
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put(_Pending(tensor, future, loop, time.monotonic()))
            self._in_flight += 1
        return await future

    def stalled(self, after: float) -> str | None:
        """Why this graph's requests can no longer be answered, or None: the thread's run in progress began
        more than `after` seconds ago (a hung GPU, a driver fault), or the thread has died."""
        started = self._run_started
        if started is not None and (seconds := time.monotonic() - started) > after:
            return (
                f"the {self._name}'s run began {seconds:.0f} s ago and has not returned "
                f"(VAE_STALL_TIMEOUT: {after:g} s)"
            )
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._closed:
            return f"the {self._name}'s thread has stopped"
        return None

    def close(self, timeout: float = 5.0) -> None:
        """Finish the runs already queued, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _work(self) -> None:
        carried: list[_Pending | None] = []  # what did not fit in the last batch: the next one's first
        while True:
            first = carried.pop() if carried else self._queue.get()
            if first is None:
                return
            batch, rows = [first], len(first.tensor)
            deadline = first.queued + self._batching.max_delay
            while rows < self._batching.max_size:
                wait = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None or rows + len(item.tensor) > self._batching.max_size:
                    carried.append(item)
                    break
                batch.append(item)
                rows += len(item.tensor)
            self._deliver(self._run_batch(batch))

    def _run_batch(self, batch: list[_Pending]) -> list[_Outcome]:
        if len(batch) == 1:
            return [self._run_alone(batch[0])]
        try:
            outputs = self._timed_run(np.concatenate([item.tensor for item in batch]))
        except Exception:  # one input may be at fault: run each alone, so that only its own request fails
            return [self._run_alone(item) for item in batch]
        outcomes: list[_Outcome] = []
        start = 0
        for item in batch:
            stop = start + len(item.tensor)
            outcomes.append((item, [output[start:stop] for output in outputs]))
            start = stop
        return outcomes

    def _run_alone(self, item: _Pending) -> _Outcome:
        try:
            return item, self._timed_run(item.tensor)
        except Exception as error:
            return item, error

    def _timed_run(self, tensor: Floats) -> list[Floats]:
        """`run`, with its start where `stalled` sees it."""
        self._run_started = time.monotonic()
        try:
            return self._run(tensor)
        finally:
            self._run_started = None

    def _deliver(self, outcomes: list[_Outcome]) -> None:
        """Hand the outcomes to the requests' event loops: one wake-up per loop and batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, some in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._resolve, some)
            except RuntimeError:  # the loop is closed: nobody waits for these any more
                pass

    def _resolve(self, outcomes: list[_Outcome]) -> None:
        """On the event loop: each request's outputs or exception."""
        self._in_flight -= len(outcomes)
        for item, result in outcomes:
            if item.future.done():  # cancelled: the client went away
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)


@dataclass(frozen=True)
class Model:
    """A loaded, checked and warmed-up VAE: encoder and decoder sessions plus their model card."""

    card: ModelCard
    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    # Execution providers in use, in ONNX Runtime's order of preference; the first runs the graph.
    providers: tuple[str, ...]
    # Called after every run (not the warm-up), with the batch size and duration of the run.
    observer: RunObserver | None = None
    # Coalesce the runs of concurrent requests on a thread per graph; None: each runs inline, on the caller.
    batching: Batching | None = None
    _batchers: dict[Graph, Batcher] = dataclass_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        batchers: dict[Graph, Batcher] = {}
        if self.batching is not None:
            batchers = {
                graph: Batcher(self._runner(graph), self.batching, f"{graph} batcher") for graph in _INTERFACE
            }
        object.__setattr__(self, "_batchers", batchers)  # a frozen dataclass sets its own fields this way

    def _runner(self, graph: Graph) -> Callable[[Floats], list[Floats]]:
        return lambda tensor: self.run(graph, tensor)  # `run` looked up at each call, as for inline runs

    @property
    def provider(self) -> str:
        """The execution provider that runs the graphs."""
        return self.providers[0]

    @property
    def latent_dim(self) -> int:
        """Length D of a latent vector."""
        return self.card.latent_dim

    def run(self, graph: Graph, tensor: Floats) -> list[Floats]:
        """One ONNX Runtime run of `graph` on its single input; its outputs in the interface's order."""
        session = self.encoder if graph == "encoder" else self.decoder
        (name,), outputs = _INTERFACE[graph]
        start = time.perf_counter()
        result: list[Floats] = session.run(list(outputs), {name: tensor})
        if self.observer is not None:
            self.observer(graph, len(tensor), time.perf_counter() - start)
        return result

    async def infer(self, graph: Graph, tensor: Floats) -> list[Floats]:
        """`run`, awaited: coalesced with concurrent requests' runs, or inline when batching is off."""
        batcher = self._batchers.get(graph)
        return self.run(graph, tensor) if batcher is None else await batcher(tensor)

    def encode(self, images: Floats) -> tuple[Floats, Floats]:
        """(N, C, H, W) images in [0, 1] -> (mu, logvar), each (N, D); runs on the caller's thread."""
        mu, logvar = self.run("encoder", self._encoder_input(images))
        return mu, logvar

    def decode(self, latents: npt.NDArray[np.floating]) -> Floats:
        """(N, D) latents -> (N, C, H, W) Bernoulli means in [0, 1]; runs on the caller's thread."""
        x_mean, _ = self.run("decoder", np.ascontiguousarray(latents, dtype=np.float32))
        return x_mean

    async def encode_async(self, images: Floats) -> tuple[Floats, Floats]:
        """`encode` for request handlers: off the event loop and coalesced when batching is on."""
        mu, logvar = await self.infer("encoder", self._encoder_input(images))
        return mu, logvar

    async def decode_async(self, latents: npt.NDArray[np.floating]) -> Floats:
        """`decode` for request handlers: off the event loop and coalesced when batching is on."""
        x_mean, _ = await self.decode_logits_async(latents)
        return x_mean

    async def decode_logits_async(self, latents: npt.NDArray[np.floating]) -> tuple[Floats, Floats]:
        """`decode_async`, with the Bernoulli logits (N, C, H, W) beside the means: -log p(x|z) is exact
        from them where float32 means have rounded to 0 or 1."""
        x_mean, logits = await self.infer("decoder", np.ascontiguousarray(latents, dtype=np.float32))
        return x_mean, logits

    def stalled(self, after: float, graph: Graph | None = None) -> str | None:
        """Why requests of `graph` (default: of either) can no longer be answered (see `Batcher.stalled`), or
        None. A run on the event loop (requests one at a time, or batching off) is not seen here: one that
        hangs leaves no request answered, the probes included, and the liveness probe's timeout acts."""
        for name, batcher in self._batchers.items():
            if graph in (None, name):
                problem = batcher.stalled(after)
                if problem is not None:
                    return problem
        return None

    def close(self, stall_timeout: float | None = None) -> None:
        """Stop the batching threads, after the runs already queued; a thread whose run has stalled (longer
        than `stall_timeout`) is not waited for."""
        for batcher in self._batchers.values():
            hung = stall_timeout is not None and batcher.stalled(stall_timeout) is not None
            batcher.close(timeout=0.0 if hung else CLOSE_WAIT_S)

    def _encoder_input(self, images: Floats) -> Floats:
        low, high = self.card.input.pixel_range
        x = images if (low, high) == (0.0, 1.0) else low + images * (high - low)
        return np.ascontiguousarray(x, dtype=np.float32)


def load_model(settings: Settings, observer: RunObserver | None = None) -> Model:
    """Read and check the model card, open both graphs, check them against it, and warm them up.

    `observer` is told about every run after the warm-up.
    """
    model_dir = settings.model_dir
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: model directory not found")
    try:
        card = load_card(model_dir)
    except ValueError as error:
        raise ModelError(str(error)) from error
    _check_card(card)
    providers = _choose_providers(settings.providers)
    # ONNX Runtime's own log lines (why CUDA did not start, say) come out as JSON records like every other.
    said = NativeLog()
    try:
        with native_stderr(native_log) as said:
            encoder = _open(model_dir, "encoder", card.encoder, settings, providers)
            decoder = _open(model_dir, "decoder", card.decoder, settings, providers)
            model = _checked(card, encoder, decoder, settings)
            _warm_up(model)
    except ModelError as error:
        if said.errors:  # the cause, in the error that is reported (VAE_REQUIRE_GPU without CUDA, say)
            causes = " | ".join(dict.fromkeys(said.errors))
            raise ModelError(f"{error}; ONNX Runtime said: {causes}") from error
        raise
    model = replace(model, observer=observer)
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


def _checked(
    card: ModelCard, encoder: ort.InferenceSession, decoder: ort.InferenceSession, settings: Settings
) -> Model:
    """The model of the two sessions, which must run on the same providers (CUDA if required)."""
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
    batching = (
        Batching(settings.batch_max_size, settings.batch_max_delay_us / 1e6) if settings.batching else None
    )
    return Model(card=card, encoder=encoder, decoder=decoder, providers=in_use, batching=batching)


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


def execution_providers(names: list[str]) -> list[tuple[str, dict[str, str]]]:
    """Execution providers as ONNX Runtime takes them, each with the options this service runs it with."""
    return [(name, dict(CUDA_OPTIONS) if name == CUDA else {}) for name in names]


def session_options(settings: Settings) -> ort.SessionOptions:
    """The session options every graph of the service is opened with."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    # The graphs are chains of layers: nothing to gain from running operators side by side.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep instead of spinning: spinning takes the CPU the event loop needs, and
    # this model's runs are too short to gain from it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _open(
    model_dir: Path, graph: Graph, spec: OnnxFile, settings: Settings, providers: list[str]
) -> ort.InferenceSession:
    """Check the file's sha256, open a session on it and check its interface against the card."""
    path = model_dir / spec.file
    try:
        if not path.is_file():
            raise ModelError(f"{path}: not found (model.json {graph}.file)")
        digest = sha256_file(path)
    except OSError as error:  # another user's file (mode 600), or in a directory of mode 700
        raise ModelError(f"{path}: cannot be read ({error.strerror}; model.json {graph}.file)") from error
    if digest != spec.sha256:
        raise ModelError(f"{path}: sha256 is {digest} but model.json {graph}.sha256 says {spec.sha256}")
    try:
        session = ort.InferenceSession(
            str(path),
            sess_options=session_options(settings),
            providers=execution_providers(providers),
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
        "decoder": (card.decoder, [latent], [image, image]),
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
                    f"model.json {graph}.{field}: names are {found}, the interface needs {list(names)} "
                    "(`python -m training export` writes it: export the model again from its checkpoint)"
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
        x_mean, logits = model.run("decoder", np.zeros((_WARMUP_BATCH, d), dtype=np.float32))
    except Exception as error:  # an ONNX Runtime failure on the warm-up is a startup failure
        raise ModelError(f"warm-up run failed: {error}") from error
    for name, array, shape in (
        ("mu", mu, (_WARMUP_BATCH, d)),
        ("logvar", logvar, (_WARMUP_BATCH, d)),
        ("x_mean", x_mean, (_WARMUP_BATCH, c, h, w)),
        ("logits", logits, (_WARMUP_BATCH, c, h, w)),
    ):
        if array.shape != shape:
            raise ModelError(f"warm-up: {name} has shape {array.shape}, the model card implies {shape}")
