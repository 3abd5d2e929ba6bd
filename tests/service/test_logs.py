"""Structured logs: one JSON object per line on stdout, an access line per request with its request id."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service import request_id
from service.config import Settings
from service.logs import native_stderr
from service.main import create_app
from tests.service.test_main import service_env, stop, uvicorn, wait_ready

ACCESS_FIELDS = {"request_id", "method", "path", "route", "status", "duration_ms"}


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "service.access"]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line parsed as a JSON object (fails on any line that is not one)."""
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(isinstance(entry, dict) for entry in entries)
    return entries


def test_each_request_gets_an_access_record(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    client.get("/sample?n=2", headers={"X-Request-ID": "req-1"})
    client.get("/sample?n=0", headers={"X-Request-ID": "req-2"})
    client.get("/v2/models/nothing", headers={"X-Request-ID": "req-3"})
    records = access_records(caplog)
    assert [(r.request_id, r.method, r.path, r.route, r.status) for r in records] == [
        ("req-1", "GET", "/sample", "/sample", 200),
        ("req-2", "GET", "/sample", "/sample", 422),
        ("req-3", "GET", "/v2/models/nothing", "/v2/models/{model_name}", 404),
    ]
    assert all(record.duration_ms > 0 for record in records)


def test_access_lines_are_json_on_stdout(client: TestClient, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    returned = client.get("/health").headers["x-request-id"]
    (line,) = json_lines(capsys.readouterr().out)
    assert ACCESS_FIELDS | {"time", "level", "logger", "message"} <= set(line)
    assert line["request_id"] == returned
    assert (line["level"], line["logger"], line["message"]) == ("INFO", "service.access", "GET /health 200")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/health", 200)


def test_records_written_during_a_request_carry_its_id(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    def during_a_request() -> None:
        request_id.accept(b"req-42")
        logging.getLogger("service.test").warning("something to note")

    capsys.readouterr()
    contextvars.copy_context().run(during_a_request)
    logging.getLogger("service.test").warning("outside any request")
    inside, outside = json_lines(capsys.readouterr().out)
    assert (inside["message"], inside["request_id"]) == ("something to note", "req-42")
    assert outside["message"] == "outside any request" and "request_id" not in outside


def test_the_access_log_can_be_turned_off(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    with TestClient(create_app(settings.model_copy(update={"access_log": False}))) as quiet:
        assert quiet.get("/health").headers["x-request-id"]
    assert access_records(caplog) == []


@pytest.mark.slow
def test_uvicorn_writes_only_json_lines(model_dir: Path, free_port: int) -> None:
    process = uvicorn(free_port, service_env(model_dir))
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{free_port}", timeout=5.0) as http:
            wait_ready(process, http)
            assert http.get("/sample?n=1", headers={"X-Request-ID": "from-the-test"}).status_code == 200
            # Pillow warns about the EXIF block of this JPEG (and reads its pixels).
            exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00garbage"
            jpeg = io.BytesIO()
            Image.new("L", (8, 8)).save(jpeg, "JPEG", exif=exif)
            assert http.post("/encode", files={"files": ("x.jpg", jpeg.getvalue())}).status_code == 200
    finally:
        output = stop(process)
    entries = json_lines(output)
    (warning,) = [entry for entry in entries if entry["logger"] == "py.warnings"]
    assert warning["level"] == "WARNING" and "Corrupt EXIF data" in warning["message"]
    messages = [entry["message"] for entry in entries]
    assert any("running on CPUExecutionProvider" in message for message in messages)
    assert "Application startup complete." in messages
    (access,) = [entry for entry in entries if entry.get("request_id") == "from-the-test"]
    assert ACCESS_FIELDS <= set(access)
    assert (access["logger"], access["route"], access["status"]) == ("service.access", "/sample", 200)
    # The access log is the service's own (with the request id), not uvicorn's as well.
    assert not any(entry["logger"] == "uvicorn.access" for entry in entries)


def test_onnxruntime_lines_while_loading_become_json_records(
    model_dir: Path, free_port: int, cuda_active: bool
) -> None:
    if cuda_active:
        pytest.skip("CUDA starts here: ONNX Runtime has nothing to say")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to fail")
    # The default providers on a machine without CUDA: ONNX Runtime explains, on its stderr, why not.
    env = service_env(model_dir, VAE_PROVIDERS="CUDAExecutionProvider,CPUExecutionProvider")
    process = uvicorn(free_port, env)
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{free_port}", timeout=5.0) as http:
            wait_ready(process, http)
    finally:
        output = stop(process)
    entries = json_lines(output)  # stdout and stderr together: every line is JSON
    native = [entry for entry in entries if entry["logger"] == "onnxruntime"]
    assert native and all(entry["level"] == "WARNING" for entry in native)
    assert any("Failed to create CUDAExecutionProvider" in entry["message"] for entry in native)
    assert len({entry["message"] for entry in native}) == len(native)  # each said once, not per graph
    messages = [entry["message"] for entry in entries]
    assert any("CUDAExecutionProvider requested but not active" in message for message in messages)


NATIVE = logging.getLogger("test.native")


def ort_line(severity: str, message: str) -> bytes:
    """A line as ONNX Runtime's logger writes it to stderr, colour codes included."""
    prefix = f"2026-11-24 19:37:52.700709930 [{severity}:onnxruntime:Default, x.cc:1 f]"
    return f"\x1b[0;93m{prefix} {message}\x1b[m\n".encode()


def relayed(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == NATIVE.name]


def test_onnxruntime_lines_are_relayed_once_at_most_as_warnings_and_others_pass_on(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG, logger=NATIVE.name), native_stderr(NATIVE) as said:
        os.write(2, ort_line("W", "OP Conv(node_conv2d) running in Fallback mode."))
        os.write(2, ort_line("I", "started"))
        os.write(2, ort_line("E", "could not load it") + b"\x1b[m\n")
        os.write(2, ort_line("E", "could not load it"))  # the second graph says it again
        os.write(2, b"Fatal Python error: not ONNX Runtime's\n")
    assert relayed(caplog) == [
        ("WARNING", "OP Conv(node_conv2d) running in Fallback mode."),
        ("INFO", "started"),
        ("WARNING", "could not load it"),  # an error it carried on from: a warning, once
    ]
    assert said.errors == ["could not load it", "could not load it"]
    assert capfd.readouterr().err == "Fatal Python error: not ONNX Runtime's\n"


def test_lines_are_relayed_as_they_come_not_when_the_block_ends(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=NATIVE.name), native_stderr(NATIVE):
        os.write(2, ort_line("W", "still loading"))
        deadline = time.monotonic() + 5
        while not relayed(caplog) and time.monotonic() < deadline:  # what a hung load has said shows
            time.sleep(0.01)
        assert relayed(caplog) == [("WARNING", "still loading")]


def test_captures_in_several_threads_take_turns_and_give_stderr_back() -> None:
    before = os.fstat(2)
    said: dict[int, list[str]] = {}
    start = threading.Barrier(4)

    def capture(n: int) -> None:
        start.wait()
        with native_stderr(NATIVE) as log:
            os.write(2, ort_line("W", f"thread {n} first"))
            time.sleep(0.01)
            os.write(2, ort_line("W", f"thread {n} second"))
        said[n] = log.messages

    threads = [threading.Thread(target=capture, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert said == {n: [f"thread {n} first", f"thread {n} second"] for n in range(4)}
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)  # fd 2 is stderr again


def test_the_model_loads_with_stderr_closed(model_dir: Path) -> None:
    # Some process managers close fd 2: the relay then stands aside, and the model still loads.
    script = (
        "import os; os.close(2)\n"
        "from service.config import Settings\n"
        "from service.runtime import load_model\n"
        f"print(load_model(Settings(model_dir={str(model_dir)!r})).provider)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines()[-1] in ("CPUExecutionProvider", "CUDAExecutionProvider")
