"""The API docs, /docs (Swagger UI) and /redoc (ReDoc): every script and style from this server, no CDN."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Route

from tests.service.api.routes.test_playground import browser_test, chromium, served

TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


def referenced(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_everything_from_this_server(client: TestClient, page: str) -> None:
    html = client.get(page).text
    urls = referenced(html)
    assert urls and all(url.startswith("/") and not url.startswith("//") for url in urls), urls
    assert "googleapis" not in html and "cdn" not in html.lower()
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"].startswith(TYPES[Path(url).suffix]), url


def test_the_docs_files_are_counted_under_their_mount(client: TestClient) -> None:
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200
    metrics = client.get("/metrics").text
    assert 'vae_http_requests_total{method="GET",route="/docs/assets",status="200"}' in metrics


@pytest.mark.slow
@pytest.mark.browser
@browser_test
def test_the_docs_render_in_a_browser_that_reaches_only_this_server(model_dir: Path, free_port: int) -> None:
    """Every request to another host is aborted, as on a machine without internet access: Swagger UI shows
    each operation of the schema, and ReDoc the API's title. The one thing they ask of another host is the
    image of ReDoc's "API docs by Redocly" link."""
    console: list[tuple[str, str]] = []
    with served(model_dir, free_port) as (base, http), chromium(console) as page:
        outside: list[tuple[str, str]] = []

        def only_here(route: Route) -> None:
            if route.request.url.startswith(base + "/"):
                route.continue_()
            else:
                outside.append((route.request.resource_type, route.request.url))
                route.abort()

        page.route("**/*", only_here)
        schema = http.get("/openapi.json").json()
        operations = sum(len(methods) for methods in schema["paths"].values())
        page.goto(f"{base}/docs")
        page.wait_for_function(f"document.querySelectorAll('.opblock').length === {operations}")
        assert page.locator(".information-container .title").inner_text().startswith(schema["info"]["title"])
        page.goto(f"{base}/redoc")
        page.locator("h1", has_text=schema["info"]["title"]).wait_for()
        assert {kind for kind, _ in outside} <= {"image"}, outside
    images = {url for _, url in outside}
    assert [(text, url) for text, url in console if url not in images] == []


@pytest.mark.parametrize("path", ["/docs/assets/swagger-ui.css", "/static/playground.css", "/"])
@pytest.mark.parametrize("range_", ["bytes=9-0", "items=0-1", "bytes=0-9"], ids=["reversed", "unit", "valid"])
def test_a_range_header_gets_the_whole_file(client: TestClient, path: str, range_: str) -> None:
    """Ignored, as RFC 9110 allows: a malformed one was a plain-text 400 (every error here is JSON)."""
    whole = client.get(path)
    response = client.get(path, headers={"range": range_})
    assert response.status_code == 200
    assert response.content == whole.content
