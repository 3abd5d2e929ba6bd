"""A change against a base revision: the same cases on both versions of the service, taking turns.

    .venv/bin/python bench/compare.py --base HEAD~1           # every case of `make bench`, 16 connections
    .venv/bin/python bench/compare.py --base main --cases "health,sample npy" --turns 4

The base revision is checked out into a temporary git worktree; the working tree is the other side. Each is
served by this virtualenv's Python, one worker, with its own models/default (`python -m service` run from a
tree imports that tree's code). Both servers are up at once and each case runs on each in balanced turns
(base, change, change, base ...), so that drift in a shared machine's load falls on both alike. Besides
requests per second it reads each server's CPU time from /proc before and after each case: CPU per request
is steadier than requests per second where the load generator shares the CPUs. Loopback only; Linux (/proc).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

from run import HOST, REPO, Server, cases, free_port, in_turns, merged, running, service_env, wrk


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(name: str, tree: Path, work: Path, **env: str) -> AbstractContextManager[Server]:
    """The service of `tree` (its code and its models/default) on a free port, until the context ends;
    `env` adds settings (VAE_DRAIN_TIMEOUT="3")."""
    port = free_port()
    command = f"cd {tree} && exec {sys.executable} -m service --host {HOST} --port {port}"
    env = service_env(tree / "models" / "default", **env)
    return running(name, command, env, port, "/ready", work / f"{name}.log")


def trees(base: str | None, work: Path, stack: ExitStack) -> list[tuple[str, Path]]:
    """("change", the working tree), after ("base", `base` checked out into a git worktree in `work`, removed
    when `stack` closes) when a base revision is named."""
    if base is None:
        return [("change", REPO)]
    tree = work / "base"
    git = ["git", "-C", str(REPO), "worktree"]
    subprocess.run([*git, "add", "--detach", "-q", str(tree), base], check=True)
    stack.callback(subprocess.run, [*git, "remove", "--force", str(tree)], check=True)
    return [("base", tree), ("change", REPO)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against (HEAD~1, main)")
    parser.add_argument("--cases", help="comma-separated case names of `make bench` (default: all of them)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--seconds", type=int, default=4, help="wrk duration of each turn (default 4)")
    parser.add_argument("--turns", type=int, default=4, help="turns of each case on each server (default 4)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed; on Debian or Ubuntu: apt-get install wrk", file=sys.stderr)
        return 2

    known = {case.name: case for case in cases(latent_dim=16)[0]}
    names = args.cases.split(",") if args.cases else list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(known)}")
    if len(set(names)) < len(names):
        parser.error(f"a case is named twice in {names}: each is measured once, in turns")
    with tempfile.TemporaryDirectory(prefix="vae-compare-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        servers = [stack.enter_context(serve(*side, work)) for side in trees(args.base, work, stack)]
        # Requests, seconds and CPU seconds of each (server, case).
        totals: dict[tuple[str, str], tuple[int, float, float]] = {}
        for name in names:
            for server in servers:
                wrk(server, known[name], args.connections, 1, work)  # warm-up, not counted
            # Each server's CPU over all the case's turns: its own runs, and its idle wait for the other's,
            # which costs next to nothing (its threads sleep).
            before = [cpu_seconds(server.pid()) for server in servers]
            runs = [(server, known[name], args.seconds) for server in servers]
            turns = in_turns(runs, args.connections, work, args.turns)
            for server, start, results in zip(servers, before, turns, strict=True):
                result = merged(results)
                used = cpu_seconds(server.pid()) - start
                totals[(server.name, name)] = (result.requests, result.seconds, used)
    print(
        f"{args.base} (base) vs the working tree (change): {args.connections} connections, "
        f"{args.turns} turns of {args.seconds} s each"
    )
    print(
        f"{'case':14s} {'req/s: base':>12s} {'change':>7s} {'ratio':>6s}   {'CPU us/req: base':>16s} change"
    )
    for name in names:
        (base_n, base_s, base_cpu), (new_n, new_s, new_cpu) = totals[("base", name)], totals[("change", name)]
        base_rate, new_rate = base_n / base_s, new_n / new_s
        print(
            f"{name:14s} {base_rate:12.0f} {new_rate:7.0f} {new_rate / base_rate:6.3f}   "
            f"{base_cpu / base_n * 1e6:16.1f} {new_cpu / new_n * 1e6:7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
