"""`make bench`: the service under wrk, against its own /health and a naive peer, and batching on vs off.

Starts the service exactly as `make serve` does (the Makefile's own recipe, one worker) on a free loopback
port, waits for /ready, and drives every case with wrk (Debian: `apt-get install wrk`) at 1, 16 and 64
connections. The references are measured in the same run: the service's /health (the HTTP limit of this
stack; it and each case take turns twice, so that drift in the load falls on both sides) and the naive peer
(`bench/peers/naive.py`: FastAPI + PyTorch eager, same weights, Pydantic float lists). Then batching on vs
off for /encode (one image) and /decode (one latent), at 1 and 64 connections, for the default model and
for a conv model with 28x28 input trained here for one epoch, the two servers taking turns. Cases that miss
their target are profiled with py-spy. Writes bench/results/<date>-<time>.json and .md.

    python bench/run.py                 # what `make bench` runs
    python bench/run.py --seconds 1     # a quick check of the harness itself

Loopback only: it starts the servers it drives and stops them (their whole process group) at the end.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
HOST = "127.0.0.1"
T = TypeVar("T")
CONNECTIONS = (1, 16, 64)
# The connections at which the targets are read.
TARGET_CONNECTIONS = 16
READY_TIMEOUT_S = 60.0
# The image of /encode: a digit, upscaled to 28x28 like MNIST, as an 8-bit greyscale PNG.
IMAGE_SIZE = 28
BOUNDARY = "vaebenchboundary"
# Comparisons in the same run take turns this many times, in balanced order (A B B A), so that drift in the
# machine's load falls on both sides alike.
TURNS = 2


@dataclass(frozen=True)
class Case:
    """One kind of request, sent over and over."""

    name: str
    method: str
    path: str
    body: bytes = b""
    content_type: str = ""


@dataclass
class Result:
    """What wrk measured for one case at one number of connections."""

    server: str
    case: str
    connections: int
    requests: int
    seconds: float
    req_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and non-2xx responses
    health_req_s: float | None = None  # /health, in turns with it: the reference of vs_health
    vs_health: float | None = None
    vs_peer: float | None = None


@dataclass
class Target:
    """One performance target (README, Performance), read from this run."""

    name: str
    figure: str
    met: bool
    case: str | None = None  # the case profiled when it is missed


@dataclass
class Report:
    started: str
    machine: dict[str, Any]
    serve_command: str
    seconds: int
    results: list[Result] = field(default_factory=list)
    batching: list[dict[str, Any]] = field(default_factory=list)
    startup: dict[str, float] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    profiles: dict[str, dict[str, list[tuple[str, float]]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# wrk reports through this Lua `done` hook: one JSON line, latencies in microseconds.
_LUA_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@cache
def digits() -> Any:
    """scikit-learn's 8x8 digits (images 0..16 and labels), read once."""
    from sklearn.datasets import load_digits

    return load_digits()


def digit_png(index: int) -> bytes:
    pixels = (digits().images[index] / 16.0 * 255.0).round().astype(np.uint8)
    image = Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(images: list[bytes]) -> tuple[bytes, str]:
    parts = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="digit{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(images)
    )
    return parts + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def json_case(name: str, path: str, content: Any) -> Case:
    return Case(name, "POST", path, json.dumps(content).encode(), "application/json")


def upload_case(name: str, images: list[bytes]) -> Case:
    body, content_type = multipart(images)
    return Case(name, "POST", "/encode", body, content_type)


def cases(latent_dim: int) -> tuple[list[Case], dict[str, Case]]:
    """The service's cases, and the peer's case for each (the same information, the naive way)."""
    z = np.random.default_rng(0).standard_normal((16, latent_dim)).round(6)
    one, sixteen = [digit_png(0)], [digit_png(i) for i in range(16)]
    kl = {"mu": z[0].tolist(), "logvar": (0.1 * z[1]).tolist()}
    health = Case("health", "GET", "/health")
    sample = Case("sample", "GET", "/sample?n=16")
    decode = json_case("decode 16", "/decode?format=array", {"latents": z.tolist()})
    encode_one, encode_sixteen = upload_case("encode 1", one), upload_case("encode 16", sixteen)
    kl_case = json_case("kl", "/kl", kl)
    service = [
        health,
        Case("sample png", "GET", "/sample?n=16&format=png"),
        Case("sample grid", "GET", "/sample?n=16&format=grid"),
        Case("sample array", "GET", "/sample?n=16&format=array"),
        Case("sample npy", "GET", "/sample?n=16&format=npy"),
        decode,
        encode_one,
        encode_sixteen,
        kl_case,
    ]
    peer = {
        "health": health,
        "sample png": sample,
        "sample grid": sample,
        "sample array": sample,
        "sample npy": sample,
        "decode 16": json_case("decode 16", "/decode", {"latents": z.tolist()}),
        "encode 1": encode_one,
        "encode 16": encode_sixteen,
        "kl": kl_case,
    }
    return service, peer


def batching_cases(latent_dim: int) -> list[Case]:
    z = np.random.default_rng(1).standard_normal((1, latent_dim)).round(6)
    return [
        upload_case("encode 1", [digit_png(0)]),
        json_case("decode 1", "/decode?format=array", {"latents": z.tolist()}),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def serve_command(port: int) -> str:
    """The recipe of `make serve`, as make would run it (without rebuilding the virtualenv)."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-s", "-n", "-o", ".venv/.serve-installed", "serve"]
        + [f"HOST={HOST}", f"PORT={port}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not out:
        raise SystemExit("`make -n serve` printed no command")
    return out


class Server:
    """A server process started through `sh -c`, in its own process group; ready when `ready` answers 200."""

    def __init__(
        self, name: str, command: str, env: dict[str, str], port: int, ready: str, log: Path
    ) -> None:
        self.name, self.port, self.log = name, port, log
        self.url = f"http://{HOST}:{port}"
        with log.open("wb") as out:
            started = time.monotonic()
            self.process = subprocess.Popen(
                ["sh", "-c", command],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + READY_TIMEOUT_S
        while not self._answers(ready):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"{name} did not become ready (exit {self.process.poll()}):\n{tail}")
            time.sleep(0.01)
        self.start_to_ready_s = time.monotonic() - started

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def pid(self) -> int:
        """The server itself: the last process started under the shell (the shell may have exec'd it)."""
        pid = self.process.pid
        while True:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if not children:
                return pid
            pid = int(children[-1])

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.unlink(missing_ok=True)


@contextmanager
def running(*args: Any) -> Iterator[Server]:
    server = Server(*args)
    try:
        yield server
    finally:
        server.stop()


def wrk(server: Server, case: Case, connections: int, seconds: int, work: Path) -> Result:
    script = work / "case.lua"
    lines = [f'wrk.method = "{case.method}"']
    if case.body:
        (work / "body.bin").write_bytes(case.body)
        lines += [
            f'local f = io.open("{work / "body.bin"}", "rb")',
            "wrk.body = f:read('*a')",
            "f:close()",
            f'wrk.headers["Content-Type"] = "{case.content_type}"',
        ]
    script.write_text("\n".join(lines) + _LUA_DONE)
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script)]
    out = subprocess.run([*command, server.url + case.path], capture_output=True, text=True)
    match = re.search(r"^WRK (\{.*\})$", out.stdout, re.MULTILINE)
    if out.returncode or match is None:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stdout}\n{out.stderr}")
    raw = json.loads(match.group(1))
    duration = raw["duration_us"] / 1e6
    return Result(
        server=server.name,
        case=case.name,
        connections=connections,
        requests=raw["requests"],
        seconds=round(duration, 3),
        req_s=round(raw["requests"] / duration, 1),
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        errors=raw["errors"],
    )


def show(result: Result) -> Result:
    latency = f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
    print(
        f"  {result.server:8s} {result.case:13s} c={result.connections:<3d} {result.req_s:9.1f} req/s  "
        f"{latency}  errors {result.errors}",
        flush=True,
    )
    return result


def drive(
    server: Server,
    some: list[Case],
    connections: tuple[int, ...],
    seconds: int,
    work: Path,
    reference: Case | None = None,
) -> list[Result]:
    """Each case at each number of connections, after a warm-up. With a `reference` (/health), the two take
    turns (reference, case, case, reference; the case half its time each turn, the reference a quarter), so
    that drift in a shared machine's load falls on both sides of each ratio alike."""
    results = []
    for case in some:
        wrk(server, case, connections[-1], 1, work)  # warm-up, not counted
        for c in connections:
            if reference is None or case == reference:
                results.append(show(wrk(server, case, c, seconds, work)))
                continue
            before, runs = in_turns(
                [(server, reference, seconds // (2 * TURNS)), (server, case, seconds // TURNS)], c, work
            )
            result = merged(runs)
            result.health_req_s = merged(before).req_s
            results.append(show(result))
    return results


def balanced(items: Sequence[T], turns: int) -> list[T]:
    """`items` `turns` times over in balanced order (A B B A ...), so that drift in the machine's load falls
    on all of them alike."""
    return [item for turn in range(turns) for item in (items if turn % 2 == 0 else items[::-1])]


def in_turns(
    runs: list[tuple[Server, Case, int]], connections: int, work: Path, turns: int = TURNS
) -> list[list[Result]]:
    """Each (server, case, seconds) run `turns` times, taking turns in balanced order: the runs of each, in
    the order given."""
    done: list[list[Result]] = [[] for _ in runs]
    for i, (server, case, seconds) in balanced(list(enumerate(runs)), turns):
        done[i].append(wrk(server, case, connections, max(1, seconds), work))
    return done


def merged(runs: list[Result]) -> Result:
    """One result of several runs of the same case: their requests over their time, mean percentiles."""
    requests, duration = sum(r.requests for r in runs), sum(r.seconds for r in runs)
    return Result(
        server=runs[0].server,
        case=runs[0].case,
        connections=runs[0].connections,
        requests=requests,
        seconds=round(duration, 3),
        req_s=round(requests / duration, 1),
        p50_ms=round(sum(r.p50_ms for r in runs) / len(runs), 3),
        p99_ms=round(sum(r.p99_ms for r in runs) / len(runs), 3),
        errors=sum(r.errors for r in runs),
    )


def alternate(
    servers: list[Server], some: list[Case], connections: tuple[int, ...], seconds: int, work: Path
) -> list[list[Result]]:
    """The same cases on several servers, taking turns (A B B A), each turn half the time: drift in the
    machine's load falls on all of them alike. One combined result per server, case and connections."""
    combined: list[list[Result]] = [[] for _ in servers]
    for case in some:
        for server in servers:
            wrk(server, case, connections[-1], 1, work)  # warm-up, not counted
        for c in connections:
            turns = in_turns([(server, case, seconds // TURNS) for server in servers], c, work)
            for i, runs in enumerate(turns):
                combined[i].append(show(merged(runs)))
    return combined


def profile(server: Server, case: Case, seconds: int, work: Path) -> dict[str, list[tuple[str, float]]]:
    """Where the event loop's thread spends its busy time while wrk drives `case` (py-spy, native frames).

    The loop's thread bounds what one worker serves; model runs happen on other threads. Three lists, in % of
    the loop's busy samples: the route handler's share against the rest (HTTP, middleware, routing, logs:
    the stack /health goes through too), the frames under the handler (inclusive), the top frames (self).
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {}
    raw = work / "profile.txt"
    record = subprocess.Popen(
        [spy, "record", "--pid", str(server.pid()), "--duration", str(max(seconds, 2)), "--rate", "250"]
        + ["--threads", "--native", "--format", "raw", "--output", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wrk(server, case, TARGET_CONNECTIONS, max(seconds, 2) + 2, work)
    record.wait(timeout=60)
    if not raw.exists():
        return {}
    handler = "run_endpoint_function (fastapi/routing.py)"
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = in_handler = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        if "MainThread" not in thread or not frames:
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        if handler in frames:
            in_handler += n
            for frame in set(frames[frames.index(handler) + 1 :]):
                under[frame] += n
    if not total:
        return {}

    def top(counter: collections.Counter[str], k: int) -> list[tuple[str, float]]:
        return [(frame, round(100 * n / total, 1)) for frame, n in counter.most_common(k)]

    return {
        "event loop thread: the route handler, and everything else": [
            ("the route handler (run_endpoint_function and below)", round(100 * in_handler / total, 1)),
            (
                "outside it: HTTP parsing and writes, middleware, routing, logs",
                round(100 * (total - in_handler) / total, 1),
            ),
        ],
        "event loop thread: under the route handler, inclusive": top(under, 15),
        "event loop thread: self": top(own, 15),
    }


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    versions = {}
    for package in (
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "pydantic",
        "orjson",
        "onnxruntime-gpu",
        "onnxruntime",
        "torch",
        "numpy",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
        "packages": versions,
        "wrk": wrk_version.strip(),
    }


def ratios(results: list[Result], peer: list[Result], peer_case: dict[str, Case]) -> None:
    health = {r.connections: r.req_s for r in results if r.case == "health"}
    peers = {(r.case, r.connections): r.req_s for r in peer}
    for r in results:
        reference = r.health_req_s or health.get(r.connections)
        r.vs_health = round(r.req_s / reference, 3) if reference else None
        base = peers.get((peer_case[r.case].name, r.connections))
        r.vs_peer = round(r.req_s / base, 2) if base else None


def targets(report: Report) -> None:
    at = {(r.case, r.connections): r for r in report.results if r.server == "service"}

    def ratio(case: str) -> float:
        return at[(case, TARGET_CONNECTIONS)].vs_health or 0.0

    add = report.targets.append
    for case, share in (
        ("sample array", 0.60),
        ("sample grid", 0.60),
        ("sample npy", 0.75),
        ("sample png", 0.35),
        ("encode 1", 0.40),
    ):
        add(Target(f"{case} >= {share:.0%} of /health", f"{ratio(case):.0%}", ratio(case) >= share, case))
    peer = at[("sample array", TARGET_CONNECTIONS)].vs_peer or 0.0
    add(Target("sample array >= 20x the naive peer", f"{peer:.1f}x", peer >= 20, "sample array"))
    one, sixteen = at[("encode 1", TARGET_CONNECTIONS)].req_s, at[("encode 16", TARGET_CONNECTIONS)].req_s
    add(Target("encode 16 PNGs costs < 4x one", f"{one / sixteen:.2f}x", one / sixteen < 4, "encode 16"))
    for r in report.results:
        if r.server == "service" and r.connections == TARGET_CONNECTIONS:
            add(
                Target(
                    f"{r.case}: p99 <= 3x p50",
                    f"{r.p99_ms / r.p50_ms:.1f}x",
                    r.p99_ms <= 3 * r.p50_ms,
                    r.case,
                )
            )
    errors = sum(r.errors for r in report.results) + sum(b["errors"] for b in report.batching)
    add(Target("zero errors everywhere", str(errors), errors == 0))
    add(
        Target(
            "start to ready <= 1.5 s",
            f"{report.startup['start_to_ready_s']:.2f} s",
            report.startup["start_to_ready_s"] <= 1.5,
        )
    )
    add(
        Target(
            "RSS <= 200 MB after the run",
            f"{report.startup['rss_mb']:.0f} MB",
            report.startup["rss_mb"] <= 200,
        )
    )
    for b in report.batching:
        if b["connections"] == 1:
            add(
                Target(
                    f"batching costs <= 5% at 1 connection: {b['model']} {b['case']}",
                    f"{b['on_vs_off']:.2f}x",
                    b["on_vs_off"] >= 0.95,
                )
            )


def conv_model(work: Path) -> Path:
    """A conv VAE on 28x28 digits (scikit-learn's, upscaled), one epoch, exported: the model directory."""
    folder = work / "digits28"
    for i, (pixels, label) in enumerate(zip(digits().images, digits().target, strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels / 16.0 * 255.0).round().astype(np.uint8))
        image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).save(
            folder / str(label) / f"{i}.png"
        )
    run, model = work / "conv-run", work / "conv28"
    train = [
        "train",
        "--out",
        str(run),
        "--dataset",
        "folder",
        "--data-dir",
        str(folder),
        "--image-size",
        "28",
    ]
    train += ["--architecture", "conv", "--epochs", "1", "--warmup-epochs", "1", "--no-progress"]
    export = ["export", "--checkpoint", str(run / "best.pt"), "--out", str(model), "--iwae-samples", "8"]
    for argv in (train, export):
        done = subprocess.run(
            [sys.executable, "-m", "training", *argv], cwd=REPO, capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(f"python -m training {' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    return model


def service_env(model_dir: Path, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("VAE_")}
    # The peer loads ONNX Runtime before the training package, which would turn its telemetry off.
    return env | {"ORT_DISABLE_TELEMETRY": "1", "VAE_MODEL_DIR": str(model_dir)} | extra


def loads(values: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in values)


def markdown(report: Report) -> str:
    m = report.machine
    packages = ", ".join(f"{name} {version}" for name, version in m["packages"].items())
    lines = [
        f"# `make bench`, {report.started}",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu']}; load average {loads(m['load_average_start'])} at the "
        f"start, {loads(m['load_average_end'])} at the end (1 / 5 / 15 min). Python {m['python']}, "
        f"{m['wrk']}, {packages}.",
        "",
        f"Service: `{report.serve_command}` (one worker, default settings). wrk -t1, {report.seconds:g} s "
        "per case after a warm-up. vs /health: to /health at the same connections, the two taking turns "
        "(health, case, case, health; the case half its time each turn, /health a quarter); vs peer: to "
        "the naive peer (bench/peers/naive.py), same endpoint and connections.",
        "",
        "| case | conns | req/s | p50 ms | p99 ms | errors | vs /health | vs peer |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report.results:
        name = r.case if r.server == "service" else f"peer: {r.case}"
        vs_health = "" if r.vs_health is None else f"{r.vs_health:.0%}"
        vs_peer = "" if r.vs_peer is None else f"{r.vs_peer:.1f}x"
        lines.append(
            f"| {name} | {r.connections} | {r.req_s:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | "
            f"{vs_health} | {vs_peer} |"
        )
    s = report.startup
    lines += [
        "",
        f"Start to /ready 200: {s['start_to_ready_s']:.2f} s (peer {s['peer_start_to_ready_s']:.2f} s). "
        f"RSS after the run: {s['rss_mb']:.0f} MB (peer {s['peer_rss_mb']:.0f} MB).",
        "",
        "Batching (VAE_BATCHING) on vs off: both servers up at once, taking turns (off, on, on, off; half "
        "the time each).",
        "",
        "| model | case | conns | off req/s | on req/s | on / off | off p50 / p99 ms | on p50 / p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in report.batching:
        off = f"{b['off_p50_ms']:.2f} / {b['off_p99_ms']:.2f}"
        on = f"{b['on_p50_ms']:.2f} / {b['on_p99_ms']:.2f}"
        lines.append(
            f"| {b['model']} | {b['case']} | {b['connections']} | {b['off_req_s']:.0f} | "
            f"{b['on_req_s']:.0f} | {b['on_vs_off']:.2f}x | {off} | {on} |"
        )
    lines += [
        "",
        "Targets (16 connections unless stated):",
        "",
        "| target | this run | met |",
        "| --- | ---: | --- |",
    ]
    lines += [f"| {t.name} | {t.figure} | {'yes' if t.met else '**no**'} |" for t in report.targets]
    for case, tables in report.profiles.items():
        lines += [
            "",
            f"Profile of `{case}` at {TARGET_CONNECTIONS} connections (py-spy, share of samples):",
            "",
        ]
        for title, rows in tables.items():
            lines += [f"{title}:", "", "| frame | % |", "| --- | ---: |"]
            lines += [f"| `{frame}` | {share} |" for frame, share in rows]
            lines.append("")
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=6, help="wrk duration of each case (default 6)")
    parser.add_argument("--no-profile", action="store_true", help="do not profile the cases that miss")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for <date>-<time>.json and .md")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed; on Debian or Ubuntu: apt-get install wrk", file=sys.stderr)
        return 2

    default_model = REPO / "models" / "default"
    latent_dim = json.loads((default_model / "model.json").read_text())["latent_dim"]
    started = datetime.now(UTC)
    command = " ".join(serve_command(8000).replace("\\\n", " ").split())
    report = Report(started.strftime("%Y-%m-%d %H:%M UTC"), machine(), command, args.seconds)
    service_cases, peer_case = cases(latent_dim)
    peer_cases = list({case.name: case for case in peer_case.values()}.values())
    with tempfile.TemporaryDirectory(prefix="vae-bench-") as tmp:
        work = Path(tmp)
        print(f"service: {report.serve_command}", flush=True)
        port = free_port()
        with running(
            "service", serve_command(port), service_env(default_model), port, "/ready", work / "service.log"
        ) as server:
            report.startup["start_to_ready_s"] = round(server.start_to_ready_s, 3)
            service = drive(
                server, service_cases, CONNECTIONS, args.seconds, work, reference=service_cases[0]
            )
            report.startup["rss_mb"] = round(server.rss_mb(), 1)
        port = free_port()
        peer_command = (
            f"{sys.executable} -m uvicorn --factory bench.peers.naive:create_app --host {HOST} --port {port}"
        )
        with running(
            "peer", peer_command, service_env(default_model), port, "/health", work / "peer.log"
        ) as server:
            report.startup["peer_start_to_ready_s"] = round(server.start_to_ready_s, 3)
            peer = drive(server, peer_cases, CONNECTIONS, args.seconds, work)
            report.startup["peer_rss_mb"] = round(server.rss_mb(), 1)
        ratios(service, peer, peer_case)
        report.results = service + peer

        print("conv model: one epoch on 28x28 digits ...", flush=True)
        conv = conv_model(work)
        for model_name, model_dir in (("default", default_model), ("conv 28x28", conv)):
            dim = json.loads((model_dir / "model.json").read_text())["latent_dim"]
            off_port, on_port = free_port(), free_port()
            off_env = service_env(model_dir, VAE_BATCHING="false")
            on_env = service_env(model_dir, VAE_BATCHING="true")
            with (
                running("off", serve_command(off_port), off_env, off_port, "/ready", work / "off.log") as off,
                running("on", serve_command(on_port), on_env, on_port, "/ready", work / "on.log") as on,
            ):
                offs, ons = alternate([off, on], batching_cases(dim), (1, 64), args.seconds, work)
            for off_run, on_run in zip(offs, ons, strict=True):
                report.batching.append(
                    {
                        "model": model_name,
                        "case": off_run.case,
                        "connections": off_run.connections,
                        "off_req_s": off_run.req_s,
                        "on_req_s": on_run.req_s,
                        "on_vs_off": round(on_run.req_s / off_run.req_s, 3),
                        "off_p50_ms": off_run.p50_ms,
                        "off_p99_ms": off_run.p99_ms,
                        "on_p50_ms": on_run.p50_ms,
                        "on_p99_ms": on_run.p99_ms,
                        "errors": off_run.errors + on_run.errors,
                    }
                )
        targets(report)

        missed = sorted({t.case for t in report.targets if not t.met and t.case is not None})
        if missed and not args.no_profile:
            by_name = {case.name: case for case in service_cases}
            port = free_port()
            with running(
                "service",
                serve_command(port),
                service_env(default_model),
                port,
                "/ready",
                work / "profile.log",
            ) as server:
                for name in missed:
                    print(f"profiling {name} ...", flush=True)
                    found = profile(server, by_name[name], args.seconds, work)
                    if found:
                        report.profiles[name] = found
                    else:
                        report.notes.append(f"no profile of {name}: py-spy is missing or could not attach")
    report.machine["load_average_end"] = os.getloadavg()

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / started.strftime("%Y-%m-%d-%H%M")
    stem.with_suffix(".json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"\nwrote {stem}.json and {stem}.md\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
