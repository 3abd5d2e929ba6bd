"""The CUDA execution provider against the CPU one, on a machine with an NVIDIA GPU.

    .venv/bin/python bench/cuda.py [--conv] [--model-dir DIR ...]

For models/default (or each --model-dir), and with --conv also for `make bench`'s conv model with 28x28
input (trained here for one epoch; needs the train extra): how far CUDA's outputs are from the CPU's (with
the service's CUDA options, and with ONNX Runtime's defaults), whether a batched CUDA run gives each row
what a run of that row alone gives, the first run at a batch size not seen before (cuDNN's convolution
search: EXHAUSTIVE, as ONNX Runtime ships, HEURISTIC, as the service runs, and DEFAULT) and the median run
per batch size on each. Sessions have the service's session options (threads, no spinning) except the
"ort_defaults" ones. Prints a table and writes bench/results/cuda-<date>-<time>.json. The service's own
tests on CUDA: `VAE_TEST_PROVIDERS=CUDAExecutionProvider .venv/bin/pytest tests/service` (README, "On a GPU").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# isort: off
import service as _service  # noqa: F401  first: it turns ONNX Runtime's telemetry off before that loads

# isort: on
import numpy as np
import onnxruntime as ort

from service.config import Settings
from service.logs import native_stderr
from service.model_card import load_card
from service.runtime import CUDA_OPTIONS, session_options

REPO = Path(__file__).resolve().parents[1]
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
PARITY_SIZES = (1, 2, 7, 64, 256)
TIMED_SIZES = (1, 16, 64, 256)
FIRST_RUN_SIZES = (3, 5, 9, 17, 33)
REPEATS = 200


def session(
    path: Path, provider: str, options: dict[str, str] | None = None, service: bool = True
) -> ort.InferenceSession:
    """A session on `provider`: with the service's session options (threads, spinning), or ONNX Runtime's."""
    providers: list[Any] = [(CUDA, options or {}), CPU] if provider == CUDA else [CPU]
    settings = session_options(Settings(model_dir=path.parent)) if service else None
    made = ort.InferenceSession(str(path), sess_options=settings, providers=providers)
    if made.get_providers()[0] != provider:
        raise SystemExit(f"{path}: {provider} is not active (ONNX Runtime runs {made.get_providers()})")
    return made


def inputs(name: str, shape: tuple[int, ...], rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "x":
        return {name: rng.uniform(size=(rows, *shape)).astype(np.float32)}
    return {name: rng.standard_normal((rows, *shape)).astype(np.float32)}


def largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest |a - b| over the outputs, relative to max(1, |b|): absolute within [-1, 1] (the decoder's
    means), relative beyond it (its logits reach tens, where float32's spacing alone is a few 1e-6)."""
    return max(float(np.max(np.abs(x - y) / np.maximum(1.0, np.abs(y)))) for x, y in zip(a, b, strict=True))


def median_run_us(made: ort.InferenceSession, feed: dict[str, np.ndarray]) -> float:
    made.run(None, feed)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        made.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(model_dir: Path) -> dict[str, Any]:
    card = load_card(model_dir)
    graphs = {
        "encoder": (model_dir / card.encoder.file, "x", tuple(card.input_shape)),
        "decoder": (model_dir / card.decoder.file, "z", (card.latent_dim,)),
    }
    result: dict[str, Any] = {
        "model": f"{card.architecture}, input {'x'.join(map(str, card.input_shape))}, "
        f"latent {card.latent_dim}",
    }
    for graph, (path, name, shape) in graphs.items():
        cpu = session(path, CPU)
        cuda = {
            "service": session(path, CUDA, dict(CUDA_OPTIONS)),
            "ort_defaults": session(path, CUDA, service=False),
        }
        parity: dict[str, dict[int, float]] = {f"{label}_vs_cpu": {} for label in cuda}
        for rows in PARITY_SIZES:
            feed = inputs(name, shape, rows, seed=rows)
            expected = cpu.run(None, feed)
            for label, made in cuda.items():
                parity[f"{label}_vs_cpu"][rows] = largest_difference(made.run(None, feed), expected)
        # Rows of one batch of 64 against each row run alone, on CUDA (dynamic batching's promise).
        feed = inputs(name, shape, 64, seed=99)
        for label, made in cuda.items():
            together = made.run(None, feed)
            alone = [made.run(None, {name: feed[name][i : i + 1]}) for i in range(64)]
            joined = [np.concatenate([out[k] for out in alone]) for k in range(len(together))]
            parity[f"batched_vs_alone_{label}"] = {64: largest_difference(together, joined)}
        first_run: dict[str, dict[int, float]] = {}
        fallback_lines: dict[str, int] = {}
        for search in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            with native_stderr(logging.getLogger("onnxruntime")) as said:
                made = session(path, CUDA, dict(CUDA_OPTIONS) | {"cudnn_conv_algo_search": search})
                made.run(None, inputs(name, shape, 2, seed=0))
                first_run[search] = {}
                for rows in FIRST_RUN_SIZES:
                    feed = inputs(name, shape, rows, seed=rows)
                    start = time.perf_counter()
                    made.run(None, feed)
                    first_run[search][rows] = (time.perf_counter() - start) * 1e6
            fallback_lines[search] = sum("Fallback mode" in message for message in said.messages)
        timed: dict[str, dict[int, float]] = {CPU: {}, **{f"{CUDA} ({label})": {} for label in cuda}}
        for label, made in ((CPU, cpu), *((f"{CUDA} ({k})", v) for k, v in cuda.items())):
            for rows in TIMED_SIZES:
                timed[label][rows] = median_run_us(made, inputs(name, shape, rows, seed=rows))
        result[graph] = {
            "parity": parity,
            "first_run_us": first_run,
            "fallback_mode_log_lines": fallback_lines,
            "median_run_us": timed,
        }
    return result


def machine() -> dict[str, Any]:
    """The GPU, its driver, the CPUs and the software that ran the measurements."""
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as error:
        gpu = f"unknown (nvidia-smi: {error})"
    return {
        "gpu": gpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, action="append", help="default: models/default")
    parser.add_argument("--conv", action="store_true", help="also the conv model of `make bench`")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stdout, format="%(name)s %(levelname)s: %(message)s")
    model_dirs = args.model_dir or [REPO / "models" / "default"]
    if CUDA not in ort.get_available_providers():
        sys.exit(f"this onnxruntime build has no {CUDA} (it has {ort.get_available_providers()})")
    with tempfile.TemporaryDirectory() as work:
        if args.conv:
            from run import conv_model

            model_dirs.append(conv_model(Path(work)))
        models = [measure(path) for path in model_dirs]
    now = datetime.now(UTC)
    report: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "models": models,
    }
    out = REPO / "bench" / "results" / f"cuda-{now:%Y-%m-%d-%H%M}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for model in models:
        print(f"\n{model['model']}")
        for graph in ("encoder", "decoder"):
            g = model[graph]
            print(f"  {graph}: largest |CUDA - CPU| by batch size")
            for key, values in g["parity"].items():
                print(f"    {key:28s} " + "  ".join(f"{k}: {v:.1e}" for k, v in values.items()))
            print("    first run at a new batch size, us (and 'Fallback mode' log lines):")
            for key, values in g["first_run_us"].items():
                runs = "  ".join(f"{k}: {v:.0f}" for k, v in values.items())
                print(f"    {key:22s} {runs}  ({g['fallback_mode_log_lines'][key]})")
            print("    median run, us:")
            for key, values in g["median_run_us"].items():
                print(f"    {key:40s} " + "  ".join(f"{k}: {v:.0f}" for k, v in values.items()))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
