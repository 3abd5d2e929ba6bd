"""GET /metrics: counts and histograms after known traffic, the model info, one registry per app."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from service.config import Settings
from service.main import create_app
from service.model_card import ModelCard
from tests.service.conftest import PROVIDERS
from tests.service.helpers import decode_scope, digit_png, files, with_state

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def fresh(settings: Settings) -> Iterator[TestClient]:
    """An app of its own, so that its counts are this test's traffic only."""
    with TestClient(create_app(settings)) as client:
        yield client


def scrape(client: TestClient) -> Samples:
    """Every sample of GET /metrics, by name and labels (parsed by prometheus_client's own parser)."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    key = (metric, frozenset(labels.items()))
    assert key in samples, f"no sample {metric}{labels}"
    return samples[key]


def test_requests_and_model_runs_are_counted(fresh: TestClient) -> None:
    for _ in range(3):
        assert fresh.get("/health").status_code == 200
    assert fresh.post("/encode", files=files(digit_png(0))).status_code == 200
    assert fresh.post("/encode", files=files(digit_png(1), digit_png(2))).status_code == 200
    assert fresh.get("/sample?n=5").status_code == 200
    assert fresh.get("/sample?n=0").status_code == 422
    assert fresh.get("/nowhere/1").status_code == 404
    assert fresh.get("/nowhere/2").status_code == 404
    for method in ("PROPFIND", "BREW"):
        assert fresh.request(method, "/health").status_code == 405
    infer = {"inputs": [{"name": "z", "shape": [2, 16], "datatype": "FP32", "data": [0.0] * 32}]}
    assert fresh.post("/v2/models/decoder/infer", json=infer).status_code == 200

    samples = scrape(fresh)
    requests = "vae_http_requests_total"
    assert value(samples, requests, method="GET", route="/health", status="200") == 3
    assert value(samples, requests, method="POST", route="/encode", status="200") == 2
    assert value(samples, requests, method="GET", route="/sample", status="200") == 1
    assert value(samples, requests, method="GET", route="/sample", status="422") == 1
    # Unmatched paths share one label: a client cannot create series by inventing paths.
    assert value(samples, requests, method="GET", route="unmatched", status="404") == 2
    infer_route = "/v2/models/{model_name}/infer"
    assert value(samples, requests, method="POST", route=infer_route, status="200") == 1
    assert not any("/nowhere" in label for _, labels in samples for _, label in labels)
    # So do methods outside HTTP's own: a client cannot create series by inventing methods either.
    assert value(samples, requests, method="other", route="/health", status="405") == 2
    assert not any(label in ("PROPFIND", "BREW") for _, labels in samples for _, label in labels)

    latency = "vae_http_request_duration_seconds"
    assert value(samples, f"{latency}_count", method="GET", route="/health") == 3
    assert value(samples, f"{latency}_bucket", method="GET", route="/health", le="+Inf") == 3
    assert value(samples, f"{latency}_sum", method="GET", route="/health") > 0

    # The warm-up runs at startup are not counted: only the traffic above.
    assert value(samples, "vae_images_encoded_total") == 3
    assert value(samples, "vae_latents_decoded_total") == 5 + 2
    assert value(samples, "vae_model_batch_size_count", graph="encoder") == 2
    assert value(samples, "vae_model_batch_size_sum", graph="encoder") == 3
    assert value(samples, "vae_model_batch_size_bucket", graph="encoder", le="1.0") == 1
    assert value(samples, "vae_model_batch_size_count", graph="decoder") == 2
    assert value(samples, "vae_model_batch_size_sum", graph="decoder") == 7
    assert value(samples, "vae_model_run_seconds_count", graph="encoder") == 2
    assert value(samples, "vae_model_run_seconds_sum", graph="decoder") > 0
    # The scrape itself is the one request in flight.
    assert value(samples, "vae_http_requests_in_flight") == 1


def test_requests_and_runs_as_long_as_the_timeouts_are_timed_within_a_bucket(fresh: TestClient) -> None:
    """With buckets that ended at 10 s (runs: 1 s), a request that took until the body timeout (or a run
    until the stall timeout) was past the last one, and histogram_quantile read it as 10 s."""
    assert fresh.post("/encode", files=files(digit_png(0))).status_code == 200
    defaults = Settings.model_fields
    for metric, labels, timeout in [
        ("vae_http_request_duration_seconds", {"method": "POST", "route": "/encode"}, "body_timeout"),
        ("vae_model_run_seconds", {"graph": "encoder"}, "stall_timeout"),
    ]:
        bounds = [
            float(le)
            for (name, sample_labels), _ in scrape(fresh).items()
            if name == f"{metric}_bucket" and labels.items() <= dict(sample_labels).items()
            for le in [dict(sample_labels)["le"]]
            if le != "+Inf"
        ]
        assert max(bounds) > defaults[timeout].default, metric


def test_the_model_info_names_the_model_its_files_and_provider(fresh: TestClient, card: ModelCard) -> None:
    info = value(
        scrape(fresh),
        "vae_model_info",
        name=card.name,
        encoder_sha256=card.encoder.sha256,
        decoder_sha256=card.decoder.sha256,
        provider=PROVIDERS[0],
    )
    assert info == 1


def test_each_app_counts_its_own_requests(settings: Settings, fresh: TestClient) -> None:
    with TestClient(create_app(settings)) as other:
        assert other.get("/health").status_code == 200
        assert other.get("/health").status_code == 200
        assert fresh.get("/health").status_code == 200
        health = {"method": "GET", "route": "/health", "status": "200"}
        assert value(scrape(other), "vae_http_requests_total", **health) == 2
        assert value(scrape(fresh), "vae_http_requests_total", **health) == 1


def test_openmetrics_when_the_scraper_asks_for_it(fresh: TestClient) -> None:
    response = fresh.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_a_malformed_accept_gets_the_text_format(fresh: TestClient) -> None:
    response = fresh.get("/metrics", headers={"accept": "application/openmetrics-text; version=abc"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "vae_http_requests_total" in response.text


def test_refusals_before_routing_count_under_the_route_asked_for(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": [SecretStr("k")]})
    with TestClient(create_app(keyed)) as client:
        assert client.post("/decode", json={"latents": [[0.0] * 16]}).status_code == 401
        assert client.get("/v2/models/decoder", headers={"x-api-key": "wrong"}).status_code == 403
        assert client.get("/nowhere").status_code == 401
        samples = scrape(client)
    requests = "vae_http_requests_total"
    assert value(samples, requests, method="POST", route="/decode", status="401") == 1
    assert value(samples, requests, method="GET", route="/v2/models/{model_name}", status="403") == 1
    assert value(samples, requests, method="GET", route="unmatched", status="401") == 1


def test_a_client_that_leaves_mid_body_is_counted_499_not_as_a_failure(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)
    sent: list[dict[str, Any]] = []

    async def scenario() -> Samples:
        arrivals = iter(
            [{"type": "http.request", "body": b'{"lat', "more_body": True}, {"type": "http.disconnect"}]
        )

        async def receive() -> dict[str, Any]:
            return next(arrivals)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async with app.router.lifespan_context(app) as state:
            await with_state(app, state)(decode_scope(), receive, send)
            async with httpx2.AsyncClient(
                transport=httpx2.ASGITransport(app=with_state(app, state)), base_url="http://test"
            ) as client:
                text = (await client.get("/metrics")).text
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    with caplog.at_level(logging.INFO):
        samples = asyncio.run(scenario())
    assert sent[0]["status"] == 499
    assert value(samples, "vae_http_requests_total", method="POST", route="/decode", status="499") == 1
    assert (
        "vae_http_requests_total",
        frozenset({("method", "POST"), ("route", "/decode"), ("status", "500")}),
    ) not in samples
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
