"""GET /metrics: the Prometheus exposition of the service's metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.deps import MetricsDep

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


# Left out of the OpenAPI schema: it is for Prometheus, in its text format, not a JSON API.
@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request, metrics: MetricsDep) -> Response:
    """Requests, latencies, model runs and batch sizes, in-flight requests, and the loaded model."""
    content, content_type = metrics.render(request.headers.get("accept"))
    return Response(content, media_type=content_type)
