"""Prometheus metrics of one app, in the app's own registry (so that several apps in one process don't mix).

The request middleware calls `observe_request` once per HTTP request; `Model.run` calls `observe_run` once per
ONNX Runtime run (the batch it ran and how long it took); the lifespan calls `describe` with the loaded model.
GET /metrics renders `render(accept)`.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector

from service.runtime import Model

__all__ = ["Metrics"]

# Request durations: this service answers most requests in well under a millisecond of work, so the
# buckets start at 250 µs (prometheus_client's defaults start at 5 ms). They go on to a minute: a body
# that arrives until VAE_BODY_TIMEOUT (30 s by default) is timed within a bucket, not past the last one,
# where a quantile reads as that bucket's bound however long the requests took.
_LATENCY_BUCKETS = (
    *(0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
    *(30.0, 60.0),
)
# One ONNX Runtime run of a small batch takes tens of microseconds on a CPU; a run that takes until
# VAE_STALL_TIMEOUT (30 s by default) is timed within a bucket too.
_RUN_BUCKETS = (
    *(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05, 0.25, 1.0),
    *(5.0, 30.0, 60.0),
)
# Batch sizes: powers of two from 1 to 4096 (by default a request carries at most 64 images or 256 latents).
_BATCH_BUCKETS = tuple(float(2**k) for k in range(13))
# Methods outside this set are counted as "other", so that a client cannot create series at will.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The ONNX graphs.
_GRAPHS = ("encoder", "decoder")


class Metrics:
    """The service's metrics; `registry` is what /metrics renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "vae_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "vae_http_request_duration_seconds",
            "Time from receiving a request to sending the last byte of its response.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "vae_http_requests_in_flight", "HTTP requests being handled now.", registry=self.registry
        )
        self.images = Counter("vae_images_encoded", "Images run through the encoder.", registry=self.registry)
        self.latents = Counter(
            "vae_latents_decoded", "Latent vectors run through the decoder.", registry=self.registry
        )
        self.run_seconds = Histogram(
            "vae_model_run_seconds",
            "Duration of one ONNX Runtime run, by graph.",
            ["graph"],
            buckets=_RUN_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "vae_model_batch_size",
            "Rows in the batch of one ONNX Runtime run, by graph.",
            ["graph"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model = Info(
            "vae_model",
            "The loaded model: card name, sha256 of the ONNX files, and the execution provider running them.",
            registry=self.registry,
        )
        # Label children resolved once: `labels()` per request would validate and lock every time.
        self._runs = {
            graph: (
                self.run_seconds.labels(graph),
                self.batch_size.labels(graph),
                self.images if graph == "encoder" else self.latents,
            )
            for graph in _GRAPHS
        }
        self._routes: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def describe(self, model: Model) -> None:
        """Set the info metric from the loaded model."""
        card = model.card
        self.model.info(
            {
                "name": card.name,
                "encoder_sha256": card.encoder.sha256,
                "decoder_sha256": card.decoder.sha256,
                "provider": model.provider,
            }
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered HTTP request of `route` (a template such as /v2/models/{model_name})."""
        if method not in _METHODS:
            method = "other"
        key = (method, route, status)
        children = self._routes.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(method, route))
            self._routes[key] = children
        count, latency = children
        count.inc()
        latency.observe(seconds)

    def observe_run(self, graph: str, batch_size: int, seconds: float) -> None:
        """Record one ONNX Runtime run of `graph` on `batch_size` rows."""
        run_seconds, sizes, rows = self._runs[graph]
        run_seconds.observe(seconds)
        sizes.observe(batch_size)
        rows.inc(batch_size)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when `accept` asks for it) and its content type."""
        try:
            encoder, content_type = choose_encoder(accept or "")
        except (TypeError, ValueError):  # prometheus_client fails on some malformed versions ("version=abc")
            encoder, content_type = choose_encoder("")  # the text format, as for no Accept at all
        return encoder(self.registry), content_type
