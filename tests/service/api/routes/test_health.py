"""GET /health, /ready, /model."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.model_card import ModelCard
from service.schemas import HealthResponse, ModelInfo, ReadyResponse
from tests.service.conftest import PROVIDERS
from tests.service.helpers import body, detail


def test_health(client: TestClient) -> None:
    assert body(client.get("/health"), HealthResponse).status == "ok"


def test_ready_reports_the_provider(client: TestClient) -> None:
    ready = body(client.get("/ready"), ReadyResponse)
    assert ready.status == "ready"
    assert ready.provider == PROVIDERS[0]


def test_model_summarises_the_card(client: TestClient, card: ModelCard) -> None:
    info = body(client.get("/model"), ModelInfo)
    assert info.name == card.name
    assert info.input_shape == card.input_shape
    assert info.latent_dim == card.latent_dim
    assert info.provider == PROVIDERS[0]
    # ONNX Runtime keeps the CPU provider last, for what the others can't run.
    assert info.providers == list(dict.fromkeys([*PROVIDERS, "CPUExecutionProvider"]))
    assert info.files["encoder"].sha256 == card.encoder.sha256
    assert info.files["decoder"].sha256 == card.decoder.sha256
    assert info.metrics == card.metrics
    assert info.dataset == card.dataset


def test_model_tells_this_servers_limits(settings: Settings) -> None:
    """A client splits its batches by them; the playground sizes its requests by them."""
    limits = {
        "max_images": 5,
        "max_latents": 20,
        "max_samples": 3,
        "max_steps": 9,
        "max_scale": 2,
        "max_body_bytes": 4096,
        "max_image_pixels": 10_000,
        "max_request_pixels": 20_000,
    }
    with TestClient(create_app(Settings(**{**settings.model_dump(), **limits}))) as limited:
        assert body(limited.get("/model"), ModelInfo).limits.model_dump() == limits


def test_before_the_lifespan_only_health_answers(settings: Settings) -> None:
    client = TestClient(create_app(settings))  # not entered: the lifespan has not loaded the model
    assert client.get("/health").status_code == 200
    assert detail(client.get("/ready"), 503) == "the model is not loaded yet"
    assert detail(client.get("/model"), 503) == "the model is not loaded yet"
