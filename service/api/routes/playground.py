"""GET /: the playground page; GET /static/{name}: its HTML, CSS, JavaScript and icon.

The files live in `service/static/` and ship inside the package. The page is plain HTML and JavaScript that
calls this service's own API from the browser; none of it appears in the OpenAPI schema.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

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
# The files served, by name: the folder's files of those kinds, listed at startup. A name from the URL is only
# ever looked up here, never handed to the filesystem (a 5000-character or NUL-holding name is just unknown).
_FILES = {path.name: path for path in sorted(STATIC_DIR.iterdir()) if path.suffix in _MEDIA_TYPES}
# Browsers revalidate on every load, so a new version of the package is seen at once.
_HEADERS = {"cache-control": "no-cache"}

router = APIRouter(tags=["playground"], include_in_schema=False)


def is_page_path(path: str) -> bool:
    """The page or one of its files: these load without an API key (the page asks for one, then sends it)."""
    return path == PAGE_PATH or path.startswith(FILES_PREFIX)


@router.get(PAGE_PATH)
async def playground() -> FileResponse:
    """The playground page."""
    return FileResponse(STATIC_DIR / "index.html", media_type=_MEDIA_TYPES[".html"], headers=_HEADERS)


@router.get(FILES_PREFIX + "{name}")
async def asset(name: str) -> FileResponse:
    """One file of the page ({name} never holds a '/': only the folder's own files are reachable)."""
    path = _FILES.get(name)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no static file {quoted(name)}")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_HEADERS)
