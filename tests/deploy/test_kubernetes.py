"""deploy/kubernetes: the manifests against the Kubernetes schemas (as shipped by kubernetes-validate), then
against what they run: the Dockerfile's port and user, the app's routes and the service's settings."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kubernetes_validate import ValidationError, validate
from kubernetes_validate.utils import all_versions, major_minor
from ruamel.yaml import YAML

from service.config import Settings
from service.main import create_app
from service.runtime import SHUTDOWN_WAIT_S
from tests.conftest import DEFAULT_MODEL, REPO
from tests.deploy.compose import load as load_compose
from tests.deploy.dockerfile import Stage, parse

KUSTOMIZE = REPO / "deploy" / "kubernetes"

# Every Kubernetes release that kubernetes-validate ships schemas for: the manifests are valid on each.
KUBERNETES_VERSIONS = sorted(
    {major_minor(version) for version in all_versions()}, key=lambda v: int(v.split(".")[1])
)


def read_yaml(path: Path) -> list[dict[str, Any]]:
    documents = [document for document in YAML(typ="safe", pure=True).load_all(path) if document is not None]
    assert all(isinstance(document, dict) for document in documents), f"{path.name} holds a non-mapping"
    return documents


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    (document,) = read_yaml(KUSTOMIZE / "kustomization.yaml")
    return document


@pytest.fixture(scope="module")
def manifests(kustomization: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes` applies, by kind (one object of each)."""
    documents = [document for name in kustomization["resources"] for document in read_yaml(KUSTOMIZE / name)]
    by_kind = {document["kind"]: document for document in documents}
    assert len(by_kind) == len(documents), "two objects of one kind"
    return by_kind


@pytest.fixture(scope="module")
def runtime() -> Stage:
    return parse(REPO / "Dockerfile").stages["runtime"]


@pytest.fixture(scope="module")
def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (api,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return api


@pytest.fixture
def settings(manifests: dict[str, dict[str, Any]], tmp_path: Path) -> Settings:
    """The ConfigMap's settings, read as the service reads them (VAE_MODEL_DIR, a path in the image, is
    checked apart)."""
    data = manifests["ConfigMap"]["data"]
    assert all(name.startswith("VAE_") for name in data), sorted(data)
    fields = {name.removeprefix("VAE_").lower(): value for name, value in data.items()}
    # extra="ignore" would drop a misspelt name silently.
    assert set(fields) <= set(Settings.model_fields), sorted(set(fields) - set(Settings.model_fields))
    return Settings(**{**fields, "model_dir": tmp_path})


def quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number: `2`, `500m`, `4Gi`, `1G`."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|[KMGT]i?)?", str(value))
    assert match, f"not a quantity: {value!r}"
    decimal = {"m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    suffixes = {**decimal, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(match[1]) * suffixes.get(match[2] or "", 1)


def test_kustomization_applies_every_manifest(kustomization: dict[str, Any]) -> None:
    assert kustomization["kind"] == "Kustomization"
    files = {path.name for path in KUSTOMIZE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_the_issues_objects_are_all_there(manifests: dict[str, dict[str, Any]]) -> None:
    kinds = {kind: document["apiVersion"] for kind, document in manifests.items()}
    assert kinds == {
        "ConfigMap": "v1",
        "Deployment": "apps/v1",
        "Service": "v1",
        "HorizontalPodAutoscaler": "autoscaling/v2",
        "PodDisruptionBudget": "policy/v1",
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_follow_the_kubernetes_schemas(manifests: dict[str, dict[str, Any]], version: str) -> None:
    # strict: an unknown field (a misspelt key) is an error too, as `kubectl apply --validate=strict` has it.
    for document in manifests.values():
        validate(document, version, strict=True)


def test_schema_catches_a_mistake(manifests: dict[str, dict[str, Any]]) -> None:
    broken = copy.deepcopy(manifests["Deployment"])
    (api,) = broken["spec"]["template"]["spec"]["containers"]
    api["readinesProbe"] = api.pop("readinessProbe")
    with pytest.raises(ValidationError, match="readinesProbe"):
        validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_configmap_holds_valid_settings_for_the_image(
    manifests: dict[str, dict[str, Any]], runtime: Stage, settings: Settings
) -> None:
    data = manifests["ConfigMap"]["data"]
    assert data["VAE_MODEL_DIR"] == runtime.env_literals()["VAE_MODEL_DIR"]
    # The Deployment reserves a GPU, so the service must use it or fail (as the GPU compose setup does).
    assert settings.providers[0] == "CUDAExecutionProvider" and settings.require_gpu


def test_container_reads_the_configmap_and_reserves_one_gpu(
    manifests: dict[str, dict[str, Any]], container: dict[str, Any], settings: Settings
) -> None:
    assert container["envFrom"] == [{"configMapRef": {"name": manifests["ConfigMap"]["metadata"]["name"]}}]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= resources["requests"].keys() and {"cpu", "memory"} <= resources[
        "limits"
    ].keys()
    # ONNX Runtime's threads: the CPUs the container may use, less one for the event loop (the default
    # would count every CPU of the node).
    assert settings.intra_op_threads == max(1, quantity(resources["limits"]["cpu"]) - 1)


def test_container_serves_the_image_port(
    manifests: dict[str, dict[str, Any]], container: dict[str, Any], runtime: Stage
) -> None:
    cmd = runtime.one("CMD").exec_form()
    (port,) = container["ports"]
    assert port["containerPort"] == int(cmd[cmd.index("--port") + 1]) == int(runtime.one("EXPOSE").value)
    assert "command" not in container and "args" not in container  # the image's CMD runs as it is
    (service_port,) = manifests["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]


def test_probes_are_the_apps_health_routes(container: dict[str, Any], runtime: Stage) -> None:
    readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (readiness["path"], liveness["path"]) == ("/ready", "/health")
    assert readiness["port"] == liveness["port"] == container["ports"][0]["name"]
    # A slow start (a larger model, the first CUDA context) is the startup probe's, not a liveness failure.
    startup = container["startupProbe"]
    assert startup["httpGet"] == liveness
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert "initialDelaySeconds" not in container["livenessProbe"]
    # Both answer 200 on the service once it has loaded its model (here on the CPU).
    app = create_app(
        Settings(model_dir=DEFAULT_MODEL, providers=["CPUExecutionProvider"], intra_op_threads=1)
    )
    with TestClient(app) as client:
        assert client.get(readiness["path"]).status_code == 200
        assert client.get(liveness["path"]).status_code == 200
    # Readiness means what the image's HEALTHCHECK (and compose's) means.
    assert f"/{readiness['path'].lstrip('/')}'" in runtime.one("HEALTHCHECK").exec_form()[-1]


def test_grace_period_covers_the_prestop_pause_and_the_drain(
    manifests: dict[str, dict[str, Any]], container: dict[str, Any], settings: Settings
) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    # `sleep` from the image's base (python:slim has coreutils).
    sleep, seconds = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and int(seconds) > 0
    # The kubelet counts the grace period from the start of preStop, then sends SIGTERM; the service then
    # drains for up to VAE_DRAIN_TIMEOUT seconds and shuts down, waiting for the model runs in progress (at
    # most SHUTDOWN_WAIT_S). SIGKILL must come after all of it.
    assert pod["terminationGracePeriodSeconds"] > int(seconds) + settings.drain_timeout + SHUTDOWN_WAIT_S


def test_runs_as_the_images_user_on_a_read_only_root(
    manifests: dict[str, dict[str, Any]], container: dict[str, Any], runtime: Stage, settings: Settings
) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    uid, _, gid = runtime.one("USER").value.partition(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (int(uid), int(gid))
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    (mount,) = container["volumeMounts"]  # /tmp, the one writable place
    (volume,) = (volume for volume in pod["volumes"] if volume["name"] == mount["name"])
    assert mount["mountPath"] == "/tmp" and "emptyDir" in volume
    # Uploads are held in memory, never spooled to /tmp: every request in flight at full size fits within
    # the memory limit, with room for the model and the rest.
    uploads = settings.max_in_flight * settings.max_body_bytes
    assert quantity(container["resources"]["limits"]["memory"]) >= 1.5 * uploads


def test_service_budget_and_autoscaler_select_the_deployments_pods(
    manifests: dict[str, dict[str, Any]],
) -> None:
    deployment = manifests["Deployment"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert manifests["Service"]["spec"]["selector"] == selector
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    # A drain allowed by the budget still leaves a replica serving.
    assert hpa["minReplicas"] > manifests["PodDisruptionBudget"]["spec"]["maxUnavailable"]
    # The autoscaler alone sets the count: a `replicas` would be applied again by each `kubectl apply`.
    assert "replicas" not in deployment["spec"] and 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]


def test_image_is_the_one_compose_builds(kustomization: dict[str, Any], container: dict[str, Any]) -> None:
    compose_image = load_compose(REPO / "docker-compose.yml")["services"]["api"]["image"]
    assert container["image"] == compose_image.split(":")[0]
    assert [image["name"] for image in kustomization["images"]] == [container["image"]]
