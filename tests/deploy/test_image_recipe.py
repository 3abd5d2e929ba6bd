"""The service image's recipe, replayed here: the builder stage's install commands in a fresh virtualenv,
then the runtime stage's CMD and HEALTHCHECK against the model it copies, as the container would run them.

A broken install line, a missing file in the wheel, a wrong library path or a CMD that does not serve
fails here instead of on a user's GPU host. Everything is read from the Dockerfile, nothing is restated.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_MODEL, REPO
from tests.deploy.dockerfile import Replay, StageState, parse

pytestmark = pytest.mark.slow

# Bounds of the served process: /ready must answer 200 within this (the default model loads and warms
# up in a few seconds on 2 cores), and SIGTERM must end it within this.
READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20


@dataclass
class Image:
    """The replayed runtime stage: its environment and working directory on this machine."""

    state: StageState
    env: dict[str, str]

    @property
    def python(self) -> Path:
        return Path(self.state.env["VIRTUAL_ENV"]) / "bin" / "python"


def host_env(shims: Path) -> dict[str, str]:
    """What the image's base gives a RUN: `python` is CPython 3.11 (here the one this venv is made from),
    and nothing of this test's own virtualenv or settings leaks in."""
    shims.mkdir()
    base_python = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    for name in ("python", "python3"):
        (shims / name).symlink_to(base_python)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VAE_", "PYTHON", "VIRTUAL_ENV", "LD_LIBRARY_PATH"))
    }
    env["PATH"] = f"{shims}:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    if not (DEFAULT_MODEL / "model.json").exists():
        pytest.fail(f"the runtime image copies {DEFAULT_MODEL}, which has no model.json (run `make train`)")
    work = tmp_path_factory.mktemp("image")
    replay = Replay(parse(REPO / "Dockerfile"), REPO, work / "root", host_env(work / "shims"))
    try:
        # The builder's own RUN: the install. (The base stage's RUN adds the image's user, not run here.)
        replay.stage("builder", run=True)
        state = replay.stage("runtime", run=False)
        yield Image(state=state, env=replay.run_env(state))
    finally:
        # The virtualenv holds ~2.5 GB of CUDA libraries: don't leave it for pytest's tmp retention.
        shutil.rmtree(work, ignore_errors=True)


def test_the_service_image_has_no_torch_and_no_trainer(image: Image) -> None:
    find = "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)"
    assert subprocess.run([image.python, "-c", find, "onnxruntime"], env=image.env).returncode == 0
    for module in ("torch", "training"):
        found = subprocess.run([image.python, "-c", find, module], cwd=image.state.workdir, env=image.env)
        assert found.returncode == 1, module
    # The project's console script would only fail to import the trainer.
    assert not (image.python.parent / "vae-train").exists()


def test_cuda_provider_finds_its_libraries_on_the_image_path(image: Image) -> None:
    # Without a GPU the CUDA provider can't start here, but its libraries can be resolved: through the
    # image's LD_LIBRARY_PATH everything is found except libcuda, which the NVIDIA Container Toolkit mounts
    # from the host driver.
    library_dirs = [Path(entry) for entry in image.env["LD_LIBRARY_PATH"].split(":")]
    assert all(directory.is_dir() for directory in library_dirs), library_dirs
    locate = "import onnxruntime, pathlib; print(pathlib.Path(onnxruntime.__file__).parent / 'capi')"
    capi = Path(subprocess.check_output([image.python, "-c", locate], env=image.env, text=True).strip())
    ldd = subprocess.run(
        ["ldd", capi / "libonnxruntime_providers_cuda.so"], env=image.env, capture_output=True, text=True
    )
    missing = {line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line}
    assert missing == {"libcuda.so.1"}, ldd.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def test_cmd_serves_the_copied_model_and_stops_on_sigterm(image: Image, tmp_path: Path) -> None:
    runtime = parse(REPO / "Dockerfile").stages["runtime"]
    argv = runtime.one("CMD").exec_form()
    image_port = argv[argv.index("--port") + 1]
    port = str(free_port())
    # The container listens on all of its interfaces; here only loopback, on a free port.
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    argv[argv.index("--host") + 1], argv[argv.index("--port") + 1] = "127.0.0.1", port
    # Everything else comes from the image's ENV (VAE_MODEL_DIR is the model it copied); no GPU here.
    env = {**image.env, "VAE_PROVIDERS": "CPUExecutionProvider"}
    base = f"http://127.0.0.1:{port}"

    log = tmp_path / "server.log"
    with log.open("wb") as out:
        # The CMD runs as PID 1 does in the container: `python` from the image's PATH, in its WORKDIR.
        process = subprocess.Popen(
            argv, cwd=image.state.workdir, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (status := get(f"{base}/ready")[0]) != 200:
            assert process.poll() is None, f"the CMD exited with {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, (
                f"/ready answered {status} for {READY_TIMEOUT_S} s:\n{log.read_text()}"
            )
            time.sleep(0.25)

        status, body = get(f"{base}/model")
        assert status == 200, body
        info = json.loads(body)
        card = json.loads((DEFAULT_MODEL / "model.json").read_text())
        assert info["name"] == card["name"] and info["provider"] == "CPUExecutionProvider"

        # The image's own HEALTHCHECK command, pointed at this port.
        check = runtime.one("HEALTHCHECK").exec_form()
        check[-1] = check[-1].replace(f"127.0.0.1:{image_port}/", f"127.0.0.1:{port}/")
        assert f":{port}/ready" in check[-1]
        assert subprocess.run(check, cwd=image.state.workdir, env=env, timeout=10).returncode == 0

        # STOPSIGNAL: the requests in flight finish, the app shuts down (lifespan included), exit 0.
        assert runtime.one("STOPSIGNAL").value == "SIGTERM"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text()
        assert "Application shutdown complete." in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
