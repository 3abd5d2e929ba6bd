"""The API docs: Swagger UI at /docs, ReDoc at /redoc, with their scripts and styles served by this service.

FastAPI's own docs pages load Swagger UI and ReDoc from a CDN (jsDelivr): in a browser that can't reach it
(an offline machine, a network that allows only internal hosts) they stay blank. `fastapi-offline` ships the
same bundles inside its package and serves them under `ASSETS_PREFIX`; the pages are FastAPI's own HTML.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

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
    return app


def is_docs_path(path: str) -> bool:
    """A docs page, the schema they show, or one of their files: these load without an API key."""
    return path in DOCS_PATHS or path.startswith(ASSETS_PREFIX + "/")
