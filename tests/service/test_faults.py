"""Faults and overload: a failing model run, a full server, SIGTERM with requests in flight, bad startups.

All but the first run the real server (`python -m service`, as `make serve` does) on a loopback port.
Requests are held in flight by uploading their bodies slowly from a raw socket: the server has read the
headers and is inside the app, waiting for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api import middleware
from service.config import Settings
from service.main import create_app
from service.model_card import ModelCard, sha256_file
from service.runtime import Model
from tests.service.helpers import decode_scope, with_state
from tests.service.test_main import service_env, stop, uvicorn, wait_ready
from tests.service.test_runtime import edit_card

# How long the server may take to notice SIGTERM, close its socket, or exit beyond its drain timeout.
SIGNAL_S = 5.0


def test_a_failing_model_run_is_a_json_500_with_the_request_id(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Model, graph: str, tensor: np.ndarray) -> list[np.ndarray]:
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code")

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        with monkeypatch.context() as patch:
            patch.setattr(Model, "run", broken)
            given = client.get("/sample?n=1", headers={"X-Request-ID": "trace-42"})
            assert given.status_code == 500
            assert given.json() == {"detail": "internal server error", "request_id": "trace-42"}
            assert given.headers["x-request-id"] == "trace-42"
            made = client.post("/decode", json={"latents": [[0.0] * 16]})
            assert made.status_code == 500
            assert re.fullmatch(r"[0-9a-f]{32}", made.json()["request_id"])
            assert made.headers["x-request-id"] == made.json()["request_id"]
        # Only those requests failed: the same app goes on serving.
        assert client.get("/ready").status_code == 200
        assert client.get("/sample?n=1").status_code == 200


def test_the_500_carries_the_cors_headers(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starlette's outermost middleware sends it, outside the CORS middleware: without the headers a page on
    an allowed origin saw a network error instead of the request id to report."""
    origin = "https://app.example"
    app = create_app(settings.model_copy(update={"cors_origins": [origin]}))
    with TestClient(app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(Model, "run", lambda self, graph, tensor: 1 / 0)  # after the warm-up
        given = client.get("/sample?n=1", headers={"Origin": origin})
        assert given.status_code == 500 and given.headers["access-control-allow-origin"] == origin
        assert "x-request-id" in given.headers["access-control-expose-headers"].lower()
        assert given.json()["request_id"] == given.headers["x-request-id"]
        elsewhere = client.get("/sample?n=1", headers={"Origin": "https://other.example"})
        assert elsewhere.status_code == 500 and "access-control-allow-origin" not in elsewhere.headers


def decode_body(rows: int = 4) -> bytes:
    return json.dumps({"latents": [[0.1 * i] * 16 for i in range(rows)]}).encode()


def start_upload(port: int, body: bytes) -> socket.socket:
    """POST /decode with only the first half of its body sent: the request is in flight until the rest."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        "POST /decode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def finish_upload(sock: socket.socket, body: bytes) -> tuple[int, Any]:
    """Send the rest of the body; the response's status and JSON."""
    with sock:
        sock.sendall(body[len(body) // 2 :])
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def ready_server(port: int, model_dir: Path, **env: str) -> Any:
    process = uvicorn(port, service_env(model_dir, **env))
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as http:
        wait_ready(process, http)
    return process


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_finishes_every_request_in_flight(model_dir: Path, free_port: int, stop_signal: int) -> None:
    process = ready_server(free_port, model_dir, VAE_DRAIN_TIMEOUT="20")
    try:
        body = decode_body()
        uploads = [start_upload(free_port, body) for _ in range(8)]
        time.sleep(0.5)  # the server has their headers: they are in flight
        process.send_signal(stop_signal)
        deadline = time.monotonic() + SIGNAL_S
        while not refuses_connections(free_port):  # it stops accepting...
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.1)
        time.sleep(1.0)
        assert process.poll() is None  # ...but waits for the requests it has
        for sock in uploads:
            status, answer = finish_upload(sock, body)
            assert status == 200, answer
            assert len(answer["images"]) == 4
        assert process.wait(timeout=SIGNAL_S) == 0
    finally:
        output = stop(process)
    assert "Application shutdown complete." in output and "Traceback" not in output


def _stalled_upload(app: Any, *headers: tuple[bytes, bytes]) -> tuple[Any, list[dict[str, Any]]]:
    """A coroutine that runs POST /decode on `app` with a body that never arrives, and what it sends."""
    sent: list[dict[str, Any]] = []
    scope = decode_scope()
    scope["headers"] = [*scope["headers"], *headers]

    async def never() -> dict[str, Any]:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return app(scope, never, send), sent


@pytest.mark.parametrize("stopping", [False, True], ids=["running", "stopping"])
def test_a_cancelled_request_is_a_503_only_when_the_server_is_stopping(
    settings: Settings, stopping: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of the drain cancels the requests still running: each gets 503 with Retry-After. Any other
    cancellation (a timeout around the app) stays a cancellation, and nothing is sent."""
    if stopping:
        monkeypatch.setattr(middleware.STOPPING, "is_set", lambda: True)
    app = create_app(settings)

    async def cancelled() -> tuple[bool, list[dict[str, Any]]]:
        async with app.router.lifespan_context(app) as state:
            call, sent = _stalled_upload(with_state(app, state))
            try:
                async with asyncio.timeout(0.2):
                    await call
            except TimeoutError:
                return True, sent
            return False, sent

    timed_out, sent = asyncio.run(cancelled())
    assert timed_out is not stopping
    if stopping:
        assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
        assert json.loads(sent[1]["body"]) == {
            "detail": "the server stopped before this request was answered; send it again"
        }
    else:
        assert sent == []


def test_the_503_at_the_stop_carries_the_cors_headers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It is answered outside the CORS middleware: without its headers a page on an allowed origin saw a
    network error, and could not read Retry-After."""
    monkeypatch.setattr(middleware.STOPPING, "is_set", lambda: True)
    origin = "https://app.example"
    app = create_app(settings.model_copy(update={"cors_origins": [origin]}))

    async def cancelled() -> list[dict[str, Any]]:
        async with app.router.lifespan_context(app) as state:
            call, sent = _stalled_upload(with_state(app, state), (b"origin", origin.encode()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await call
            return sent

    start = asyncio.run(cancelled())[0]
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"access-control-allow-origin"] == origin.encode()
    assert b"retry-after" in headers[b"access-control-expose-headers"].lower()


# A signal arriving while `python -m service` imports `{module}`; then prints the modules imported after it.
_SIGNAL_WHILE_IMPORTING = """
import os, runpy, signal, sys
after = []
def hook(event, args):
    if event == "import":
        if args[0] == "{module}" and not after:
            os.kill(os.getpid(), signal.{signal})
            after.append(args[0])
        elif after:
            after.append(args[0])
sys.addaudithook(hook)
sys.argv = ["python -m service"]
try:
    runpy.run_module("service", run_name="__main__", alter_sys=True)
finally:
    print(" ".join(after))
"""


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("module", ["uvicorn", "onnxruntime.capi.onnxruntime_pybind11_state"])
def test_a_stop_while_starting_exits_0(model_dir: Path, stop: str, module: str) -> None:
    """An orchestrator that stops a process it has just started, or a Ctrl-C, sees it exit 0, not killed by
    the signal (nor a KeyboardInterrupt traceback): the handlers are in place before the imports that take
    the first few tenths of a second. They only note the signal until the imports are done, which this
    checks: SystemExit raised in the middle of onnxruntime's native module setting itself up came out as
    `ImportError: initialization failed` and exit 1. When a signal lands there is a matter of timing, so
    that symptom is not reproduced here (3 of 60 starts stopped 0.29 s in did so, before the change)."""
    result = subprocess.run(
        [sys.executable, "-c", _SIGNAL_WHILE_IMPORTING.format(signal=stop, module=module)],
        env=service_env(model_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # The imports went on to their end (onnxruntime's own modules after its native one), and no further.
    assert "onnxruntime.capi.onnxruntime_inference_collection" in result.stdout.split()
    assert "service.main" not in result.stdout.split()


@pytest.mark.slow
def test_a_second_ctrl_c_cuts_the_drain_short_but_not_the_shutdown(model_dir: Path, free_port: int) -> None:
    """Ctrl-C again while requests drain stops waiting for them (uvicorn's "CTRL+C to force quit"); the app's
    shutdown still runs, and the process exits 0 without an ERROR record."""
    process = ready_server(free_port, model_dir, VAE_DRAIN_TIMEOUT="20")
    try:
        stuck = start_upload(free_port, decode_body())  # never finished
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        start = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=SIGNAL_S) == 0
        assert time.monotonic() - start < 10  # not the 20 s drain
        with stuck:
            response = http.client.HTTPResponse(stuck)
            response.begin()
            assert (response.status, response.getheader("Retry-After")) == (503, "1")
    finally:
        output = stop(process)
    assert "Application shutdown complete." in output, output
    assert "Traceback" not in output and '"level":"ERROR"' not in output, output


# `python -m service` whose app shutdown takes 2 s (the model's close waits before closing).
_SLOW_SHUTDOWN = """
import sys, time
import service.runtime
close = service.runtime.Model.close
def slow_close(self, *args, **kwargs):
    time.sleep(2)
    close(self, *args, **kwargs)
service.runtime.Model.close = slow_close
from service.__main__ import main
sys.exit(main(["--port", "{port}"]))
"""


@pytest.mark.slow
def test_a_ctrl_c_during_the_apps_shutdown_does_not_run_it_twice(model_dir: Path, free_port: int) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SHUTDOWN.format(port=free_port)],
        env=service_env(model_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{free_port}", timeout=5.0) as http:
            wait_ready(process, http)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # no request in flight: the app's shutdown has begun
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=SIGNAL_S) == 0
    finally:
        output = stop(process)
    assert output.count("Waiting for application shutdown.") == 1, output
    assert output.count("Application shutdown complete.") == 1, output


@pytest.mark.slow
def test_drain_timeout_bounds_the_wait(model_dir: Path, free_port: int) -> None:
    """A request still running when the drain ends is answered 503 (it may be sent again), without a
    traceback in the log."""
    process = ready_server(free_port, model_dir, VAE_DRAIN_TIMEOUT="2")
    try:
        stuck = start_upload(free_port, decode_body())  # never finished
        time.sleep(0.5)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=2 + SIGNAL_S) == 0
        assert time.monotonic() - start >= 2.0
        with stuck:
            response = http.client.HTTPResponse(stuck)
            response.begin()
            assert (response.status, response.getheader("Retry-After")) == (503, "1")
            assert json.loads(response.read()) == {
                "detail": "the server stopped before this request was answered; send it again"
            }
    finally:
        output = stop(process)
    assert "Cancel 1 running task(s), timeout graceful shutdown exceeded" in output
    assert "Traceback" not in output and "Exception in ASGI application" not in output
    assert '"status":503' in output  # the access log says what the client got


@pytest.mark.slow
def test_a_flood_past_the_in_flight_limit_is_refused_fast(model_dir: Path, free_port: int) -> None:
    limit = 4
    process = ready_server(free_port, model_dir, VAE_MAX_IN_FLIGHT=str(limit))
    base = f"http://127.0.0.1:{free_port}"
    try:
        body = decode_body()
        held = [start_upload(free_port, body) for _ in range(limit)]
        time.sleep(0.5)

        async def flood() -> list[tuple[int, str | None]]:
            limits = httpx2.Limits(max_connections=64)
            # The held uploads finish only after the flood: requests that were queued rather than refused
            # would time out.
            async with httpx2.AsyncClient(base_url=base, timeout=10.0, limits=limits) as http:

                async def one(path: str) -> tuple[int, str | None]:
                    response = await http.get(path)
                    return response.status_code, response.headers.get("retry-after")

                paths = ["/sample?n=4", "/model", "/sample?n=1&format=grid"] * 40
                return await asyncio.gather(*(one(path) for path in paths))

        refused = asyncio.run(flood())
        assert {status for status, _ in refused} == {503}
        assert {retry_after for _, retry_after in refused} == {"1"}
        with httpx2.Client(base_url=base, timeout=5.0) as http:
            assert http.get("/ready").status_code == 200  # probes are never refused
            assert http.get("/health").status_code == 200
            for sock in held:
                status, answer = finish_upload(sock, body)
                assert status == 200, answer  # every accepted request succeeds
            assert http.get("/sample?n=4").status_code == 200
    finally:
        stop(process)


@pytest.mark.slow
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_too_large_is_refused_and_the_connection_closed(
    model_dir: Path, free_port: int, declared: bool
) -> None:
    """The client is told 413 and the server hangs up: it neither reads nor waits for the rest of a body
    it will not use (declared: 100 MB, of which 1 KB is sent; chunked: the limit is crossed while reading)."""
    limit = 4096
    process = ready_server(free_port, model_dir, VAE_MAX_BODY_BYTES=str(limit))
    try:
        with socket.create_connection(("127.0.0.1", free_port), timeout=5) as sock:
            head = "POST /decode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            if declared:
                sock.sendall(f"{head}Content-Length: 100000000\r\n\r\n".encode() + b" " * 1024)
            else:
                chunk = b" " * 2048
                chunks = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks * 3)
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 413
            assert response.getheader("connection") == "close"
            assert json.loads(response.read())["detail"].startswith("the request body is ")
            assert sock.recv(1) == b""  # closed by the server: no timeout waiting for more of the body
    finally:
        stop(process)


def _grow_latent_in_card(raw: dict[str, Any]) -> None:
    """A card consistent in itself, for a latent size the graphs do not have."""
    d = raw["latent_dim"] + 1
    raw["latent_dim"] = d
    for tensor in [*raw["encoder"]["outputs"], *raw["decoder"]["inputs"]]:
        tensor["shape"] = [None, d]


def _corrupt_encoder(model_dir: Path, card: ModelCard) -> None:
    path = model_dir / card.encoder.file
    path.write_bytes(b"this is not an ONNX protobuf")
    edit_card(model_dir, lambda raw: raw["encoder"].update(sha256=sha256_file(path)))


def _append_to_decoder(model_dir: Path, card: ModelCard) -> None:
    with (model_dir / card.decoder.file).open("ab") as handle:
        handle.write(b"\0")


@pytest.mark.slow
def test_startup_faults_exit_non_zero_with_a_clear_message(
    model_dir: Path, card: ModelCard, tmp_path: Path
) -> None:
    """Each fault, in its own process (all at once): a message naming it, a non-zero exit, never a port."""
    faults: dict[str, tuple[dict[str, str], int, str]] = {}

    def broken_copy(name: str, damage: Any) -> Path:
        import shutil

        copy = tmp_path / name
        shutil.copytree(model_dir, copy)
        damage(copy)
        return copy

    faults["model-dir-missing"] = (
        {"VAE_MODEL_DIR": str(tmp_path / "gone")},
        2,
        f"invalid setting VAE_MODEL_DIR: Value error, model directory '{tmp_path / 'gone'}' does not exist",
    )
    # The typo that causes the failure: VAE_MODEL_DIRS set, VAE_MODEL_DIR left pointing nowhere.
    faults["misspelt-setting"] = (
        {"VAE_MODEL_DIR": str(tmp_path / "gone"), "VAE_MODEL_DIRS": str(model_dir)},
        2,
        "VAE_MODEL_DIRS is not a setting, and is ignored: did you mean VAE_MODEL_DIR?",
    )
    faults["unknown-provider"] = (
        {"VAE_PROVIDERS": "CPUExecutionProvider,NoSuchExecutionProvider"},
        2,
        "invalid setting VAE_PROVIDERS: Value error, unknown execution provider NoSuchExecutionProvider;",
    )
    corrupt = broken_copy("corrupt", lambda copy: _corrupt_encoder(copy, card))
    faults["onnx-corrupt"] = (
        {"VAE_MODEL_DIR": str(corrupt)},
        3,
        f"{corrupt / card.encoder.file}: ONNX Runtime cannot load it",
    )
    changed = broken_copy("changed", lambda copy: _append_to_decoder(copy, card))
    faults["sha256-mismatch"] = (
        {"VAE_MODEL_DIR": str(changed)},
        3,
        f"{changed / card.decoder.file}: sha256 is ",
    )
    grown = broken_copy("grown", lambda copy: edit_card(copy, _grow_latent_in_card))
    d = card.latent_dim
    faults["card-vs-onnx-shapes"] = (
        {"VAE_MODEL_DIR": str(grown)},
        3,
        f"model.json encoder.outputs[0].shape is [None, {d + 1}] but the graph has [None, {d}]",
    )

    processes = {}
    for name, (env, _, _) in faults.items():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        processes[name] = uvicorn(port, service_env(model_dir, **env))
    for name, process in processes.items():
        _, code, message = faults[name]
        try:
            process.wait(timeout=60)
        finally:
            output = stop(process)
        assert process.returncode == code, f"{name}: exit {process.returncode}\n{output}"
        assert message in output, f"{name}:\n{output}"
        if code == 3:  # the model: one ERROR line says what, before the traceback
            first_error = next(json.loads(line) for line in output.splitlines() if '"ERROR"' in line)
            assert first_error["message"].startswith("cannot serve the model: "), output
            assert message in first_error["message"], output
        assert "Uvicorn running on" not in output, f"{name} listened:\n{output}"


@pytest.mark.slow
def test_idle_connections_stay_open_past_uvicorns_default(model_dir: Path, free_port: int) -> None:
    """VAE_KEEP_ALIVE_TIMEOUT (75 s by default) reaches uvicorn, whose own 5 s is below the 60 s that a proxy
    in front keeps its idle connections open: a connection idle for longer than 5 s is still served."""
    process = ready_server(free_port, model_dir)
    connection = http.client.HTTPConnection("127.0.0.1", free_port, timeout=5)
    try:
        connection.request("GET", "/health")
        assert connection.getresponse().read() == b'{"status":"ok"}'
        sock = connection.sock
        time.sleep(6)
        connection.request("GET", "/health")
        assert connection.getresponse().read() == b'{"status":"ok"}'
        assert connection.sock is sock  # the same connection, not a new one
    finally:
        connection.close()
        stop(process)
