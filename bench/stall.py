"""Large uploads against everyone else: how long other requests wait while one client sends large images.

    .venv/bin/python bench/stall.py                  # the working tree
    .venv/bin/python bench/stall.py --base HEAD~1    # the same on a base revision, the two taking turns

Each tree is served as `bench/compare.py` serves it (this virtualenv's Python, one worker, the tree's own
models/default). On each: `/health` latency with nothing else running (the reference), then again while one
client posts a 4096 x 4096 PNG of random pixels (3.4 MB, real decoding work) to `/encode` back to back, and
that large request's own latency. With `--base`, both servers are up at once and take turns (base, change,
change, base), so that drift in a shared machine's load falls on both alike. Loopback only.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
from compare import serve, trees
from PIL import Image
from run import Server, balanced

SIDE = 4096
# Seconds between two /health probes: a light load that leaves the large uploads the server.
PROBE_INTERVAL_S = 0.005


def large_png() -> bytes:
    pixels = (np.random.default_rng(0).random((SIDE, SIDE)) > 0.5).astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def probe(client: httpx.Client, seconds: float) -> list[float]:
    """/health latencies, in seconds, for `seconds`."""
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        client.get("/health").raise_for_status()
        latencies.append(time.perf_counter() - start)
        time.sleep(PROBE_INTERVAL_S)
    return latencies


def turn(server: Server, png: bytes, seconds: float) -> tuple[list[float], list[float], list[float]]:
    """Idle /health latencies, /health latencies under large uploads, and the uploads' own latencies."""
    stop = threading.Event()
    uploads: list[float] = []

    def upload() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while not stop.is_set():
                start = time.perf_counter()
                response = client.post("/encode", files={"files": ("large.png", png, "image/png")})
                response.raise_for_status()
                uploads.append(time.perf_counter() - start)

    with httpx.Client(base_url=server.url) as client:
        idle = probe(client, seconds)
        sender = threading.Thread(target=upload)
        sender.start()
        try:
            while not uploads and sender.is_alive():  # the first upload answered: they are under way
                time.sleep(0.01)
            if not uploads:
                raise SystemExit(f"{server.name}: the large upload failed (see the traceback above)")
            busy = probe(client, seconds)
        finally:
            stop.set()
            sender.join()
    return idle, busy, uploads


def ms(values: list[float], q: float) -> float:
    return float(np.quantile(values, q) * 1000.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="also measure this git revision (HEAD~1, main), in turns")
    parser.add_argument("--seconds", type=float, default=5.0, help="probing time of each phase (default 5)")
    parser.add_argument("--turns", type=int, default=2, help="turns on each server (default 2)")
    args = parser.parse_args(argv)
    png = large_png()
    with tempfile.TemporaryDirectory(prefix="vae-stall-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        sides = trees(args.base, work, stack)
        servers = [stack.enter_context(serve(name, tree, work)) for name, tree in sides]
        order = balanced(servers, args.turns)
        measured: dict[str, tuple[list[float], list[float], list[float]]] = {
            server.name: ([], [], []) for server in servers
        }
        for server in order:
            for total, part in zip(measured[server.name], turn(server, png, args.seconds), strict=True):
                total.extend(part)
    print(f"/health latency, ms, alone and while one client posts {SIDE}x{SIDE} PNGs ({len(png)} bytes)")
    print(f"{'server':8s} {'alone p50':>9s} {'p99':>6s}   {'busy p50':>8s} {'p99':>7s} {'max':>7s}   upload")
    for name, (idle, busy, uploads) in measured.items():
        alone = f"{ms(idle, 0.5):9.2f} {ms(idle, 0.99):6.2f}"
        loaded = f"{ms(busy, 0.5):8.2f} {ms(busy, 0.99):7.2f} {max(busy) * 1000:7.1f}"
        upload = f"median {statistics.median(uploads) * 1000:.0f} ms of {len(uploads)}"
        print(f"{name:8s} {alone}   {loaded}   {upload}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
