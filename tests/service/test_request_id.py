"""X-Request-ID: taken from the request when acceptable, generated otherwise, and always returned."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize(
    "path, status",
    [("/health", 200), ("/sample?n=0", 422), ("/nowhere", 404)],
    ids=["ok", "validation-error", "not-found"],
)
def test_the_callers_id_comes_back(client: TestClient, path: str, status: int) -> None:
    response = client.get(path, headers={"X-Request-ID": "checkout-7f3a/retry.2"})
    assert response.status_code == status
    assert response.headers["x-request-id"] == "checkout-7f3a/retry.2"


def test_without_an_id_each_request_gets_a_fresh_one(client: TestClient) -> None:
    first, second = (client.get("/health").headers["x-request-id"] for _ in range(2))
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second)
    assert first != second


@pytest.mark.parametrize(
    "given",
    ["x" * 129, "two words", "forged\\nline", ""],
    ids=["too-long", "space", "backslash", "empty"],
)
def test_an_unacceptable_id_is_replaced(client: TestClient, given: str) -> None:
    returned = client.get("/health", headers={"X-Request-ID": given}).headers["x-request-id"]
    assert GENERATED.fullmatch(returned)
