"""A route's path with a trailing slash: a 307 to the path without it, as a relative URL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.service.helpers import detail


@pytest.mark.parametrize(
    ("method", "path", "location"),
    [
        ("GET", "/sample/?n=2&seed=1", "/sample?n=2&seed=1"),
        ("POST", "/decode/", "/decode"),
        ("GET", "/model//", "/model"),
        ("HEAD", "/health/", "/health"),
        ("GET", "/v2/models/decoder/", "/v2/models/decoder"),
    ],
)
def test_a_trailing_slash_redirects_to_the_route(
    client: TestClient, method: str, path: str, location: str
) -> None:
    # Whatever Host the client sent and whatever scheme a proxy in front took: the Location names neither.
    response = client.request(method, path, headers={"host": "elsewhere.example"}, follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == location


def test_the_redirect_keeps_the_method_and_body(client: TestClient) -> None:
    response = client.post("/decode/?format=array", json={"latents": [[0.0] * 16]})
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [307]
    assert len(response.json()["images"]) == 1


@pytest.mark.parametrize(
    "path",
    ["/nothing/", "/static/", "/sample%2F", "/sample%2f/", "/docs/assets/sample/"],
    ids=["no-route", "static", "encoded-slash", "encoded-then-plain", "inside-the-docs-mount"],
)
def test_a_trailing_slash_on_no_route_is_404(client: TestClient, path: str) -> None:
    """An encoded slash is part of the name (redirecting `/sample%2F` to itself looped); a path inside the
    docs' mount is not the app's `/sample`."""
    response = client.get(f"http://testserver{path}", follow_redirects=False)
    assert detail(response, 404) == "Not Found"
