"""docker-compose.yml and its CPU override: the compose specification's schema, then what a deployment
needs of the services, checked against the Dockerfile, the load balancer's nginx configuration and the
service's settings."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import pytest
from check_jsonschema.builtin_schemas import get_builtin_schema
from jsonschema import Draft202012Validator

from service.config import Settings
from service.runtime import SHUTDOWN_WAIT_S
from tests.conftest import REPO
from tests.deploy.compose import interpolate, load, merge, plain
from tests.deploy.dockerfile import Stage, parse
from tests.deploy.nginx import CONF, directives

COMPOSE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"

# The GPU reservation compose passes to the NVIDIA Container Toolkit: one GPU, with the `gpu` capability.
ONE_NVIDIA_GPU = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    """`docker compose up`, with no variable set (every one has a default)."""
    return interpolate(load(COMPOSE), {})


@pytest.fixture(scope="module")
def cpu(gpu: dict[str, Any]) -> dict[str, Any]:
    """`docker compose -f docker-compose.yml -f docker-compose.cpu.yml up`."""
    return merge(gpu, interpolate(load(CPU_OVERRIDE), {}))


@pytest.fixture(scope="module")
def runtime() -> Stage:
    return parse(REPO / "Dockerfile").stages["runtime"]


def schema_errors(document: dict[str, Any]) -> list[str]:
    # The compose specification's schema (compose-spec/compose-spec), as vendored by check-jsonschema.
    validator = Draft202012Validator(get_builtin_schema("vendor.compose-spec"))
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def without(mapping: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if key not in keys}


def container_port(mapping: str) -> str:
    return mapping.rsplit(":", 1)[1]


def seconds(duration: str) -> int:
    """A compose duration in whole seconds (`30s`)."""
    assert duration.endswith("s") and duration[:-1].isdigit(), duration
    return int(duration[:-1])


def nginx_size(size: str) -> int:
    """An nginx size (`16m`) in bytes."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(size[:-1]) * units[size[-1].lower()] if size[-1].lower() in units else int(size)


def volume(service: dict[str, Any], name: str) -> tuple[str, str]:
    """The (container path, mode) where `service` mounts the named volume (short syntax)."""
    (mount,) = (entry for entry in service["volumes"] if entry.split(":")[0] == name)
    _, target, *mode = mount.split(":")
    return target, mode[0] if mode else "rw"


def assert_settings(environment: dict[str, str], tmp_path: Path) -> Settings:
    """The VAE_ variables are Settings fields (extra="ignore" would drop a misspelt one) and valid."""
    fields = {
        name.removeprefix("VAE_").lower(): value
        for name, value in environment.items()
        if name.startswith("VAE_")
    }
    assert set(fields) <= set(Settings.model_fields), sorted(set(fields) - set(Settings.model_fields))
    return Settings(**{**fields, "model_dir": tmp_path})


@pytest.mark.parametrize(
    "files",
    [[COMPOSE], [CPU_OVERRIDE], [COMPOSE, CPU_OVERRIDE]],
    ids=["gpu", "cpu-override-alone", "gpu+cpu-override"],
)
def test_follows_the_compose_specification(files: list[Path]) -> None:
    document = interpolate(load(files[0]), {})
    for override in files[1:]:
        document = merge(document, interpolate(load(override), {}))
    assert schema_errors(plain(document)) == []


def test_schema_catches_a_mistake(gpu: dict[str, Any]) -> None:
    # The schema really is applied: a misspelt key and a device without its required capabilities.
    broken = copy.deepcopy(gpu)
    broken["services"]["api"]["healthchek"] = broken["services"]["api"].pop("healthcheck")
    del broken["services"]["api"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]
    assert len(schema_errors(broken)) == 2


def test_api_reserves_one_nvidia_gpu(gpu: dict[str, Any], tmp_path: Path) -> None:
    api = gpu["services"]["api"]
    assert api["deploy"]["resources"]["reservations"]["devices"] == [ONE_NVIDIA_GPU]
    settings = assert_settings(api["environment"], tmp_path)
    assert settings.providers[0] == "CUDAExecutionProvider" and settings.require_gpu


def test_api_health_checks_ready_like_the_image(gpu: dict[str, Any], runtime: Stage) -> None:
    check = gpu["services"]["api"]["healthcheck"]
    image_check = runtime.one("HEALTHCHECK")
    assert check["test"] == ["CMD", *image_check.exec_form()]
    assert "/ready" in check["test"][-1]
    timing = {key.replace("_", "-"): str(value) for key, value in check.items() if key != "test"}
    assert timing == image_check.flags


def test_api_serves_the_image_port_and_model(gpu: dict[str, Any], runtime: Stage) -> None:
    api = gpu["services"]["api"]
    assert api["build"] == {"context": ".", "target": "runtime"}
    # Reached through the load balancer only: a fixed host port would stop `--scale api=N` at one replica.
    # So only the balancer reaches it, and uvicorn may take the client's address from its X-Forwarded-For.
    assert "ports" not in api
    assert api["environment"]["FORWARDED_ALLOW_IPS"] == "*"
    assert api["expose"] == [runtime.one("EXPOSE").value]
    assert api["environment"]["VAE_MODEL_DIR"] == runtime.env_literals()["VAE_MODEL_DIR"]
    assert volume(api, "models") == ("/models", "ro")


def test_api_is_read_only_restarts_and_stops_gracefully(gpu: dict[str, Any], runtime: Stage) -> None:
    api = gpu["services"]["api"]
    assert api["read_only"] is True and "/tmp" in api["tmpfs"]
    assert api["restart"] == "unless-stopped"
    assert api["stop_signal"] == runtime.one("STOPSIGNAL").value
    # The service drains requests in flight for VAE_DRAIN_TIMEOUT seconds, then its shutdown waits for the
    # model runs in progress (at most SHUTDOWN_WAIT_S), before Docker's SIGKILL.
    drain_timeout = Settings.model_fields["drain_timeout"].default
    assert "VAE_DRAIN_TIMEOUT" not in api["environment"]
    assert seconds(api["stop_grace_period"]) > drain_timeout + SHUTDOWN_WAIT_S


def test_balancer_publishes_the_port_and_proxies_to_every_api_replica(
    gpu: dict[str, Any], runtime: Stage
) -> None:
    lb = gpu["services"]["lb"]
    nginx = CONF.read_text()
    # The deployed configuration is the one tests/deploy/test_load_balancer.py runs, mounted read-only.
    source, target, mode = lb["volumes"][0].split(":")
    assert (REPO / source).resolve() == CONF and mode == "ro"
    assert target == "/etc/nginx/conf.d/default.conf"
    assert lb["image"].startswith("nginxinc/nginx-unprivileged:")
    ((listen,),) = directives(nginx, "listen")
    assert [container_port(mapping) for mapping in lb["ports"]] == [listen]
    # The upstream is the `api` service on the image's port, looked up again as replicas come and go.
    ((address, *flags),) = directives(nginx, "server")
    assert address == f"api:{runtime.one('EXPOSE').value}" and "resolve" in flags
    assert lb["depends_on"] == {"api": {"condition": "service_healthy"}}
    assert lb["healthcheck"]["test"][-1] == f"http://127.0.0.1:{listen}/ready"
    assert lb["read_only"] is True and "/tmp" in lb["tmpfs"] and lb["restart"] == "unless-stopped"


def test_balancer_lets_through_what_the_api_accepts() -> None:
    # A body the service takes must not be refused by nginx first (its own default is 1 MiB).
    ((size,),) = directives(CONF.read_text(), "client_max_body_size")
    assert nginx_size(size) == Settings.model_fields["max_body_bytes"].default


def test_cpu_override_drops_the_gpu_and_nothing_else(
    gpu: dict[str, Any], cpu: dict[str, Any], tmp_path: Path
) -> None:
    api = cpu["services"]["api"]
    assert "devices" not in api["deploy"]["resources"]["reservations"]
    settings = assert_settings(api["environment"], tmp_path)
    assert settings.providers == ["CPUExecutionProvider"] and not settings.require_gpu
    assert without(api, "deploy", "environment") == without(gpu["services"]["api"], "deploy", "environment")
    assert without(cpu["services"], "api") == without(gpu["services"], "api")
    assert without(cpu, "services") == without(gpu, "services")


def test_trainer_exports_into_the_apis_models_volume(gpu: dict[str, Any]) -> None:
    trainer, api = gpu["services"]["trainer"], gpu["services"]["api"]
    assert trainer["profiles"] == ["train"]
    assert trainer["build"] == {"context": ".", "target": "trainer"}
    target, mode = volume(trainer, "models")
    assert mode == "rw" and target == volume(api, "models")[0]
    # The trainer image's CMD (train, then export) writes the model where the volume is mounted.
    command = shlex.split(parse(REPO / "Dockerfile").stages["trainer"].one("CMD").exec_form()[-1])
    export = command[command.index("export") :]
    out = Path(export[export.index("--out") + 1])
    assert out.is_relative_to(target)
    assert {"models", "runs"} <= gpu["volumes"].keys()
