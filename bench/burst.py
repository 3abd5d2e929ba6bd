"""The largest uploads all at once: the server's peak memory, other requests' latency, and its shutdown.

    .venv/bin/python bench/burst.py                  # the working tree
    .venv/bin/python bench/burst.py --base HEAD~1    # the same on a base revision, the two taking turns

VAE_MAX_IN_FLIGHT (128) clients each POST `/encode` one JSON body just under VAE_MAX_BODY_BYTES (16 MiB):
a PNG of random pixels in base64, decoded for real. That is the most the service's limits let requests hold
at once. Each turn starts a fresh server (served as `bench/compare.py` serves a tree) and measures its peak
resident memory (VmHWM), `/health` latency while the burst is served, and the time to the last answer. A
second fresh server, with VAE_DRAIN_TIMEOUT=3, gets SIGTERM 6 s into the same burst: the seconds it takes
to exit are the drain's 3 and whatever the event loop could not do in time. With `--base`, the two trees
take turns (base, change, change, base). Loopback only; Linux (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import io
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from compare import serve, trees
from PIL import Image
from run import HOST, Server, balanced

CLIENTS = 128  # VAE_MAX_IN_FLIGHT's default
MAX_BODY_BYTES = 16 * 1024 * 1024  # VAE_MAX_BODY_BYTES' default
DRAIN_TIMEOUT_S = 3
SIGTERM_AFTER_S = 6.0
# Seconds between two /health probes.
PROBE_INTERVAL_S = 0.05


def largest_body() -> bytes:
    """`{"images": ["<base64 PNG>"]}` of random RGB pixels, as large as fits in MAX_BODY_BYTES."""
    side = int((MAX_BODY_BYTES * 3 / 4 / 3) ** 0.5)
    while True:
        pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
        body = b'{"images": ["' + base64.b64encode(buffer.getvalue()) + b'"]}'
        if len(body) <= MAX_BODY_BYTES:
            return body
        side -= 8


@dataclass
class Burst:
    statuses: Counter[str] = field(default_factory=Counter)
    last_answer_s: float = 0.0
    health_ms: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    exit_s: float | None = None  # after SIGTERM


async def _post(port: int, body: bytes) -> str:
    """One POST /encode on a connection of its own; the status line, or why there was none."""
    head = (
        f"POST /encode HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(head + body)
        await writer.drain()
        status = (await reader.readline()).decode().strip()
        writer.close()
        return status.partition(" ")[2] or "closed without an answer"
    except OSError as error:
        return type(error).__name__


def _probe(port: int, stop: threading.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        connection = http.client.HTTPConnection(HOST, port, timeout=60)
        try:
            connection.request("GET", "/health")
            connection.getresponse().read()
            latencies.append((time.perf_counter() - start) * 1000)
        except OSError:
            break  # the server has stopped
        finally:
            connection.close()
        time.sleep(PROBE_INTERVAL_S)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def burst(server: Server, body: bytes, *, sigterm: bool) -> Burst:
    """CLIENTS uploads of `body` at once (and SIGTERM SIGTERM_AFTER_S into them, with `sigterm`)."""
    result, stop = Burst(), threading.Event()
    prober = threading.Thread(target=_probe, args=(server.port, stop, result.health_ms))

    async def send() -> None:
        started = time.perf_counter()

        async def timed() -> str:
            status = await _post(server.port, body)
            result.last_answer_s = max(result.last_answer_s, time.perf_counter() - started)
            return status

        uploads = asyncio.gather(*(timed() for _ in range(CLIENTS)))
        if sigterm:
            await asyncio.sleep(SIGTERM_AFTER_S)
            result.peak_rss_mb = _peak_rss_mb(server.process.pid)
            signalled = time.perf_counter()
            os.kill(server.process.pid, signal.SIGTERM)
            await asyncio.to_thread(server.process.wait, 120)
            result.exit_s = time.perf_counter() - signalled
        result.statuses.update(await uploads)

    prober.start()
    try:
        asyncio.run(send())
        if not sigterm:
            result.peak_rss_mb = _peak_rss_mb(server.process.pid)
    finally:
        stop.set()
        prober.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="also measure this git revision (HEAD~1, main), in turns")
    parser.add_argument("--turns", type=int, default=2, help="turns on each tree (default 2)")
    args = parser.parse_args(argv)
    body = largest_body()
    with tempfile.TemporaryDirectory(prefix="vae-burst-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        sides = trees(args.base, work, stack)
        order = balanced(sides, args.turns)
        measured: dict[str, list[tuple[Burst, Burst]]] = {name: [] for name, _ in sides}
        for name, tree in order:
            with serve(name, tree, work) as server:
                served = burst(server, body, sigterm=False)
            with serve(name, tree, work, VAE_DRAIN_TIMEOUT=str(DRAIN_TIMEOUT_S)) as server:
                stopped = burst(server, body, sigterm=True)
            measured[name].append((served, stopped))
    print(f"{CLIENTS} POST /encode at once, each a {len(body)}-byte JSON body; fresh servers, one per line")
    print(
        f"{'tree':7s} {'peak RSS':>9s} {'/health p50':>11s} {'max':>8s} {'last answer':>11s}   answers"
        f"   |  SIGTERM at {SIGTERM_AFTER_S:g} s, drain {DRAIN_TIMEOUT_S} s: exit after, peak RSS then"
    )
    for name, runs in measured.items():
        for served, stopped in runs:
            health = np.asarray(served.health_ms)
            answers = ", ".join(f"{count} {status}" for status, count in sorted(served.statuses.items()))
            print(
                f"{name:7s} {served.peak_rss_mb:5.0f} MiB {np.median(health):8.1f} ms {health.max():5.0f} ms "
                f"{served.last_answer_s:9.1f} s   {answers}   |  {stopped.exit_s:.1f} s, "
                f"{stopped.peak_rss_mb:.0f} MiB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
