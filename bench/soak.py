"""Soak test (`make soak`): the real service under a steady mix of every endpoint, bad requests included.

Starts the service exactly as `make serve` does (`python -m service`) on a free loopback port, with an API
key and small body and pixel limits so that refusals are part of the mix, then drives it with 64 connections
until the time or the request budget runs out. Every kind of request has the status it must get; anything
else, or a failed connection, is an unexpected error. Reports requests and unexpected errors by status,
p50/p99 latency per window of time, and the server's RSS at the start, after the first minute and at the end.

    python bench/soak.py --seconds 600 --requests 2000000   # what `make soak` runs

Exits 1 on any unexpected error, or when RSS grew 5 % or more from the first minute to the end. Loopback
only: it starts the server it drives and sends nothing anywhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from run import HOST, REPO, RESULTS, free_port  # bench/run.py: the same loopback host and results folder

KEY = "soak-test-key-6b0d2f"
# Limits of the soaked server, small enough for the mix to cross them cheaply.
BODY_LIMIT = 256 * 1024
PIXEL_LIMIT = 1024 * 1024
# RSS may grow less than this from the first minute to the end.
RSS_GROWTH_LIMIT = 0.05
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix, how often it is sent, and the status it must get."""

    name: str
    weight: int
    expected: int
    method: str
    url: str
    request: dict[str, Any] = field(default_factory=dict)


def bomb_png(side: int) -> bytes:
    """A 1-bit black side x side PNG: a few kilobytes that would decode to side² pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress((b"\0" * (1 + (side + 7) // 8)) * side, 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def mix(latent_dim: int, pngs: list[bytes]) -> list[Kind]:
    """Every endpoint, valid and invalid, weighted roughly as clients would send them."""
    key = {"Authorization": f"Bearer {KEY}"}
    text = {**key, "content-type": "text/plain"}
    as_json = {**key, "content-type": "application/json"}
    z = [[0.1 * ((i + j) % 7 - 3) for j in range(latent_dim)] for i in range(16)]

    def files(*images: bytes) -> dict[str, Any]:
        return {"files": [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]}

    ok: list[tuple[str, int, str, str, dict[str, Any]]] = [
        ("health", 4, "GET", "/health", {}),
        ("ready", 4, "GET", "/ready", {}),
        ("model", 2, "GET", "/model", {}),
        ("sample-png", 8, "GET", "/sample?n=16&seed=1", {}),
        ("sample-array", 4, "GET", "/sample?n=16&format=array", {}),
        ("sample-grid", 4, "GET", "/sample?n=16&format=grid&scale=4", {}),
        ("encode-multipart", 8, "POST", "/encode?samples=2&seed=3", files(pngs[0])),
        (
            "encode-json",
            4,
            "POST",
            "/encode",
            {"json": {"images": [base64.b64encode(p).decode() for p in pngs]}},
        ),
        ("decode", 8, "POST", "/decode", {"json": {"latents": z}}),
        ("kl-json", 4, "POST", "/kl", {"json": {"mu": z, "logvar": [[-1.0] * latent_dim] * 16}}),
        ("kl-images", 2, "POST", "/kl", files(*pngs[:2])),
        ("reconstruct", 4, "POST", "/reconstruct?format=array", files(*pngs)),
        ("interpolate-json", 4, "POST", "/interpolate?steps=8", {"json": {"latents": z[:2]}}),
        ("interpolate-images", 2, "POST", "/interpolate?format=grid", files(*pngs[:2])),
    ]
    kinds = [
        Kind(name, weight, 200, method, url, {**req, "headers": key}) for name, weight, method, url, req in ok
    ]
    bad = [
        Kind("no-key", 2, 401, "GET", "/model"),
        Kind(
            "wrong-key", 2, 403, "POST", "/decode", {"json": {"latents": z}, "headers": {"X-API-Key": "nope"}}
        ),
        Kind("not-found", 1, 404, "GET", "/nowhere", {"headers": key}),
        Kind("wrong-content-type", 2, 415, "POST", "/encode", {"content": b"hello", "headers": text}),
        Kind("corrupt-image", 2, 400, "POST", "/reconstruct", {**files(pngs[0][:40]), "headers": key}),
        Kind("not-an-image", 1, 400, "POST", "/encode", {**files(b"just text"), "headers": key}),
        Kind("wrong-length", 2, 422, "POST", "/decode", {"json": {"latents": [[0.0] * 3]}, "headers": key}),
        Kind(
            "nan",
            1,
            422,
            "POST",
            "/decode",
            {"content": b'{"latents": [[NaN]]}', "headers": as_json},
        ),
        Kind("malformed-json", 1, 422, "POST", "/kl", {"content": b'{"mu": [', "headers": as_json}),
        Kind("too-many", 2, 422, "GET", "/sample?n=100000", {"headers": key}),
        Kind(
            "body-too-large",
            1,
            413,
            "POST",
            "/decode",
            {"content": b" " * (BODY_LIMIT + 1), "headers": as_json},
        ),
        Kind("pixel-bomb", 1, 413, "POST", "/encode", {**files(bomb_png(4096)), "headers": key}),
    ]
    return kinds + bad


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("VAE_")}
    env |= {
        "VAE_MODEL_DIR": os.environ.get("VAE_MODEL_DIR", "models/default"),
        "VAE_PROVIDERS": os.environ.get("VAE_PROVIDERS", "CPUExecutionProvider"),
        "VAE_API_KEYS": KEY,
        "VAE_MAX_BODY_BYTES": str(BODY_LIMIT),
        "VAE_MAX_IMAGE_PIXELS": str(PIXEL_LIMIT),
        # One log line per request would be the soak's biggest cost; errors are still logged.
        "VAE_ACCESS_LOG": "false",
    }
    command = [sys.executable, "-m", "service", "--host", HOST, "--port", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


@dataclass
class Record:
    """What the load loop saw: per request (start offset, seconds, kind, status or -1 for no response)."""

    starts: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    rss: list[tuple[float, int]] = field(default_factory=list)
    # The status each kind of request must get.
    expected: dict[str, int] = field(default_factory=dict)


async def drive(base: str, pid: int, seconds: float, budget: int, connections: int, seed: int) -> Record:
    record = Record()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0) as http:
        key = {"Authorization": f"Bearer {KEY}"}
        model = (await http.get("/model", headers=key)).json()
        sampled = (await http.get("/sample?n=4&seed=7&scale=3", headers=key)).json()
        kinds = mix(model["latent_dim"], [base64.b64decode(image) for image in sampled["images"]])
        record.expected = {kind.name: kind.expected for kind in kinds}
        weights = [kind.weight for kind in kinds]
        start = time.monotonic()
        deadline = start + seconds
        sent = 0

        async def worker(index: int) -> None:
            nonlocal sent
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < deadline and sent < budget:
                sent += 1
                kind = rng.choices(kinds, weights)[0]
                began = time.monotonic()
                try:
                    response = await http.request(kind.method, kind.url, **kind.request)
                    await response.aread()
                    status = response.status_code
                except httpx.HTTPError as error:
                    status = -1
                    record.failures[f"{kind.name}: {type(error).__name__}"] += 1
                record.starts.append(began - start)
                record.seconds.append(time.monotonic() - began)
                record.kinds.append(kind.name)
                record.statuses.append(status)

        async def sample_rss() -> None:
            while time.monotonic() < deadline and sent < budget:
                record.rss.append((time.monotonic() - start, rss_bytes(pid)))
                await asyncio.sleep(1.0)

        record.rss.append((0.0, rss_bytes(pid)))
        await asyncio.gather(sample_rss(), *(worker(i) for i in range(connections)))
        record.rss.append((time.monotonic() - start, rss_bytes(pid)))
    return record


def report(record: Record, seconds: float) -> dict[str, Any]:
    starts = np.asarray(record.starts)
    latency_ms = np.asarray(record.seconds) * 1000.0
    statuses = np.asarray(record.statuses)
    expected = np.asarray([record.expected[name] for name in record.kinds])
    unexpected = statuses != expected
    elapsed = float(starts.max()) if len(starts) else 0.0
    window = 60.0 if seconds >= 300 else max(seconds / 5, 1.0)
    windows = []
    for low in np.arange(0.0, elapsed + 1e-9, window):
        inside = (starts >= low) & (starts < low + window)
        if inside.any():
            windows.append(
                {
                    "from_s": round(float(low)),
                    "to_s": round(float(min(low + window, elapsed))),
                    "requests": int(inside.sum()),
                    "per_s": round(float(inside.sum()) / window, 1),
                    "p50_ms": round(float(np.percentile(latency_ms[inside], 50)), 2),
                    "p99_ms": round(float(np.percentile(latency_ms[inside], 99)), 2),
                    "unexpected": int(unexpected[inside].sum()),
                }
            )
    by_kind: dict[str, Counter[int]] = defaultdict(Counter)
    for name, status, bad in zip(record.kinds, record.statuses, unexpected, strict=True):
        if bad:
            by_kind[name][status] += 1
    baseline_at = min(60.0, elapsed / 10)
    baseline = next((rss for at, rss in record.rss if at >= baseline_at), record.rss[-1][1])
    end = record.rss[-1][1]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(elapsed, 1),
        "requests": len(statuses),
        "per_s": round(len(statuses) / elapsed, 1) if elapsed else 0.0,
        "statuses": {str(code): int(count) for code, count in sorted(Counter(record.statuses).items())},
        "unexpected": int(unexpected.sum()),
        "unexpected_by_kind": {name: {str(s): n for s, n in c.items()} for name, c in by_kind.items()},
        "connection_failures": dict(record.failures),
        "p50_ms": round(float(np.percentile(latency_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(latency_ms, 99)), 2),
        "windows": windows,
        "rss_mb": {
            "start": round(record.rss[0][1] / 2**20, 1),
            f"at_{round(baseline_at)}_s": round(baseline / 2**20, 1),
            "end": round(end / 2**20, 1),
            "growth_from_baseline_pct": round(100.0 * (end - baseline) / baseline, 2),
        },
    }


def print_summary(result: dict[str, Any]) -> None:
    print(f"{result['requests']} requests in {result['seconds']} s ({result['per_s']}/s), 64 connections")
    print("statuses:", ", ".join(f"{code}: {count}" for code, count in result["statuses"].items()))
    print(f"unexpected: {result['unexpected']}", result["unexpected_by_kind"], result["connection_failures"])
    print(f"latency: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
    print("| window | requests | req/s | p50 ms | p99 ms | unexpected |")
    print("| --- | --- | --- | --- | --- | --- |")
    for w in result["windows"]:
        cells = [
            f"{w['from_s']}-{w['to_s']} s",
            *(w[k] for k in ("requests", "per_s", "p50_ms", "p99_ms", "unexpected")),
        ]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    print("RSS (MB):", ", ".join(f"{name} {value}" for name, value in result["rss_mb"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to drive it (default 600)")
    parser.add_argument("--requests", type=int, default=2_000_000, help="request budget (default 2 000 000)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/soak-<time>.json)")
    args = parser.parse_args(argv)

    port = free_port()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    log = RESULTS / f"soak-{stamp}.log"
    server = start_server(port, log)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                print(f"the server did not get ready:\n{log.read_text()}", file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{base}/ready", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        record = asyncio.run(
            drive(base, server.pid, args.seconds, args.requests, args.connections, args.seed)
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = report(record, args.seconds) | {"server_exit": server.returncode}
    out = args.out or RESULTS / f"soak-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result)
    print(f"written to {out}")
    growth = result["rss_mb"]["growth_from_baseline_pct"] / 100.0
    if result["unexpected"] > 0 or growth >= RSS_GROWTH_LIMIT or server.returncode != 0:
        print(f"FAILED; the server's log is {log}", file=sys.stderr)
        return 1
    log.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
