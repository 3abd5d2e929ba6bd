"""GET /: the playground page; GET /static/{name}: its HTML, CSS, JavaScript and icon.

The files live in `service/static/` and ship inside the package. The page is plain HTML and JavaScript that
calls this service's own API from the browser; none of it appears in the OpenAPI schema.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Response, status

from service.api.bodies import quoted

__all__ = ["FILES_PREFIX", "PAGE_PATH", "STATIC_DIR", "is_page_path", "router"]

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
PAGE_PATH = "/"
FILES_PREFIX = "/static/"
# The kinds of file the page is made of, and their media types; nothing else is served.
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The files served, by name, with their media types: the folder's files of those kinds, read at startup (a
# few kilobytes). A name from the URL is only ever looked up here, never handed to the filesystem (a
# 5000-character or NUL-holding name is just unknown); and a file is always sent whole (a Range header is
# ignored, as RFC 9110 allows, rather than answered with a plain-text 400 when it is malformed).
_FILES = {
    path.name: (path.read_bytes(), _MEDIA_TYPES[path.suffix])
    for path in sorted(STATIC_DIR.iterdir())
    if path.suffix in _MEDIA_TYPES
}
# Browsers revalidate on every load, so a new version of the package is seen at once. The page runs only its
# own files (its images are data: URLs of the API's PNGs), calls only this origin, and is not to be framed
# by another site (it holds the API key the user typed): what else a browser is asked to refuse.
_HEADERS = {
    "cache-control": "no-cache",
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}

router = APIRouter(tags=["playground"], include_in_schema=False)


def is_page_path(path: str) -> bool:
    """The page or one of its files: these load without an API key (the page asks for one, then sends it)."""
    return path == PAGE_PATH or path.startswith(FILES_PREFIX)


def _file(name: str) -> Response:
    content, media_type = _FILES[name]
    return Response(content, media_type=media_type, headers=_HEADERS)


@router.get(PAGE_PATH)
async def playground() -> Response:
    """The playground page."""
    return _file("index.html")


@router.get(FILES_PREFIX + "{name}")
async def asset(name: str) -> Response:
    """One file of the page ({name} never holds a '/': only the folder's own files are reachable)."""
    if name not in _FILES:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no static file {quoted(name)}")
    return _file(name)
