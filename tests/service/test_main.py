"""The app as a whole: factory and settings, no torch, OpenAPI, JSON errors, and a real uvicorn process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings, get_settings
from service.main import create_app
from service.model_card import load_card
from service.runtime import Model
from service.schemas import EncodeResponse, SampleResponse
from tests.service.helpers import detail, digit_png, files

REPO = Path(__file__).resolve().parents[2]
# How long a fresh interpreter may take to import the service, load the model and answer /ready.
STARTUP_S = 30.0


def service_env(model_dir: Path, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("VAE_")}
    return env | {"VAE_MODEL_DIR": str(model_dir), "VAE_PROVIDERS": "CPUExecutionProvider"} | extra


def test_create_app_without_arguments_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    for name, value in service_env(model_dir, VAE_MAX_LATENTS="20").items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as client:
            assert client.get("/ready").status_code == 200
            assert detail(client.get("/sample?n=21"), 422)[0]["msg"].endswith("at most 20 (VAE_MAX_LATENTS)")
    finally:
        get_settings.cache_clear()


def test_the_service_never_imports_torch(model_dir: Path) -> None:
    # A fresh interpreter: this test process has torch loaded by other tests.
    script = textwrap.dedent(
        """
        import sys
        from fastapi.testclient import TestClient
        from service.main import create_app
        from tests.service.helpers import digit_png, files

        with TestClient(create_app()) as client:
            assert client.post("/encode?samples=1", files=files(digit_png(0))).status_code == 200
            assert client.get("/sample?n=2&format=grid").status_code == 200
            assert client.post("/reconstruct", files=files(digit_png(1))).status_code == 200
        print(sorted(name for name in sys.modules if name == "torch" or name.startswith("torch.")))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=service_env(model_dir),
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_errors_are_json_with_a_detail(client: TestClient) -> None:
    assert detail(client.get("/nowhere"), 404) == "Not Found"
    assert detail(client.get("/encode"), 405) == "Method Not Allowed"


def test_an_unexpected_failure_is_a_json_500(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Model, graph: str, tensor: np.ndarray) -> list[np.ndarray]:
        raise RuntimeError("onnxruntime blew up")

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        monkeypatch.setattr(Model, "run", broken)
        assert detail(client.get("/sample?n=1"), 500) == "internal server error"
        assert client.get("/ready").status_code == 200  # the process keeps serving


def operations(client: TestClient) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in client.get("/openapi.json").json()["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_every_route_declares_its_responses(client: TestClient) -> None:
    for path, method, operation in operations(client):
        ok = operation["responses"]["200"]["content"]
        assert "schema" in ok["application/json"], f"{method} {path}"
        if method == "post":
            assert {"400", "415", "422"} & set(operation["responses"]) >= {"415", "422"}, f"{method} {path}"


def test_every_request_body_has_working_examples(client: TestClient) -> None:
    assert post_every_example(client) >= 6  # encode, decode, kl (3), reconstruct, interpolate, v2 infer


def test_examples_are_written_for_the_loaded_models_latent_dim(tiny_model: Path, settings: Settings) -> None:
    """A model of 3 latents documents examples of 3 latents: /docs' "Try it out" works on any model."""
    assert load_card(tiny_model).latent_dim == 3
    with TestClient(create_app(settings.model_copy(update={"model_dir": tiny_model}))) as other:
        assert post_every_example(other) >= 6


def post_every_example(client: TestClient) -> int:
    """POST each request body's examples in the served schema; each must be a 200. How many there were."""
    bodies = 0
    for path, method, operation in operations(client):
        if "requestBody" not in operation:
            continue
        json_body = operation["requestBody"]["content"]["application/json"]
        assert json_body["examples"], f"{method} {path} has no example"
        url = path
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":
                url = url.replace(f"{{{parameter['name']}}}", parameter["schema"]["examples"][0])
        for name, example in json_body["examples"].items():
            response = client.request(method, url, json=example["value"])
            assert response.status_code == 200, f"{method} {path} {name}: {response.text}"
            bodies += 1
    return bodies


def uvicorn(port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    """The service exactly as `make serve` starts it, on `port`."""
    return subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(process: subprocess.Popen[str]) -> str:
    """Terminate (then kill) the process; its output."""
    if process.poll() is None:
        process.terminate()
    try:
        output, _ = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate(timeout=10)
    return output


def wait_ready(process: subprocess.Popen[str], http: httpx2.Client) -> None:
    """Poll /ready until it answers 200; fail with the server's output if it exits or takes too long."""
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert process.poll() is None, f"uvicorn exited early:\n{stop(process)}"
        assert time.monotonic() < deadline, f"not ready after {STARTUP_S} s:\n{stop(process)}"
        try:
            if http.get("/ready").status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.1)


@pytest.mark.slow
def test_serves_over_http(model_dir: Path, free_port: int, tmp_path: Path) -> None:
    # HOME where ONNX Runtime's usage telemetry would write its database: the service keeps it off.
    process = uvicorn(free_port, service_env(model_dir, HOME=str(tmp_path)))
    base = f"http://127.0.0.1:{free_port}"
    try:
        with httpx2.Client(base_url=base, timeout=5.0) as http:
            wait_ready(process, http)
            assert http.get("/ready").json()["provider"] == "CPUExecutionProvider"
            sample = SampleResponse.model_validate_json(http.get("/sample?n=3&seed=1").content)
            assert len(sample.images) == 3
            encoded = http.post("/encode?samples=2&seed=1", files=files(digit_png(0)))
            assert np.shape(EncodeResponse.model_validate_json(encoded.content).z)[:2] == (1, 2)
            assert (
                http.post("/encode", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
            )
    finally:
        output = stop(process)
    assert "running on CPUExecutionProvider" in output
    assert list(tmp_path.rglob("*")) == []  # no telemetry database, no device id
    assert "telemetry" not in output


@pytest.mark.slow
def test_require_gpu_without_cuda_exits_with_a_clear_message(
    model_dir: Path, free_port: int, cuda_active: bool
) -> None:
    if cuda_active:
        pytest.skip("CUDA is active here")
    env = service_env(model_dir, VAE_REQUIRE_GPU="true")
    del env["VAE_PROVIDERS"]  # the default: CUDA, then the CPU
    process = uvicorn(free_port, env)
    try:
        process.wait(timeout=STARTUP_S)
    finally:
        output = stop(process)
    assert process.returncode != 0
    assert "VAE_REQUIRE_GPU=true but ONNX Runtime runs on CPUExecutionProvider" in output
    assert "Application startup failed" in output
