"""The API docs: Swagger UI at /docs, ReDoc at /redoc, with their scripts and styles served by this service.

FastAPI's own docs pages load Swagger UI and ReDoc from a CDN (jsDelivr): in a browser that can't reach it
(an offline machine, a network that allows only internal hosts) they stay blank. `fastapi-offline` ships the
same bundles inside its package and serves them under `ASSETS_PREFIX`; the pages are FastAPI's own HTML.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.routes.playground import FILES_PREFIX

__all__ = ["ASSETS_PREFIX", "DOCS_PATHS", "create_fastapi", "is_docs_path"]

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
OPENAPI_URL = "/openapi.json"
# Where the bundles are served: the pages' scripts, styles and icon.
ASSETS_PREFIX = "/docs/assets"
DOCS_PATHS = frozenset({DOCS_URL, REDOC_URL, OAUTH2_REDIRECT_URL, OPENAPI_URL})


def create_fastapi(**kwargs: Any) -> FastAPI:
    """`FastAPI(**kwargs)` with the docs pages served from here."""
    app: FastAPI = FastAPIOffline(
        docs_url=DOCS_URL,
        redoc_url=REDOC_URL,
        openapi_url=OPENAPI_URL,
        swagger_ui_oauth2_redirect_url=OAUTH2_REDIRECT_URL,
        static_url=ASSETS_PREFIX,
        favicon_url=f"{FILES_PREFIX}favicon.svg",  # the playground's icon
        **kwargs,
    )
    for route in app.router.routes:
        if isinstance(route, Mount) and route.path == ASSETS_PREFIX:
            route.app = _whole_files(route.app)
    return app


def _whole_files(app: ASGIApp) -> ASGIApp:
    """`app` (the bundles' StaticFiles) with Range headers dropped: each file is sent whole, as RFC 9110
    allows, where Starlette answers a malformed range with a plain-text 400."""

    async def whole(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
        await app(scope, receive, send)

    return whole


def is_docs_path(path: str) -> bool:
    """A docs page, the schema they show, or one of their files: these load without an API key."""
    return path in DOCS_PATHS or path.startswith(ASSETS_PREFIX + "/")
