"""The guards in front of every route: body size, work in flight, API keys and CORS (in process)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import SecretStr
from starlette.types import Message

from service.api import guards
from service.config import Settings
from service.main import create_app
from tests.service.helpers import detail, digit_png, files, with_state

# Small limits, so that a small request crosses them.
BODY_LIMIT = 4096
KEYS = ["first-key-0123456789", "second-key-0123456789"]
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def guarded(settings: Settings) -> Iterator[TestClient]:
    """An app with a small body limit, two API keys and one CORS origin."""
    keys = [SecretStr(key) for key in KEYS]
    update = {"max_body_bytes": BODY_LIMIT, "api_keys": keys, "cors_origins": [ORIGIN]}
    with TestClient(create_app(settings.model_copy(update=update))) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


LATENTS = {"latents": [[0.0] * 16]}


# Body size


def test_declared_length_past_the_limit_is_413_before_the_app_runs(guarded: TestClient) -> None:
    # A content type the route would refuse with 415: the 413 comes first, from the header alone.
    response = guarded.post(
        "/decode", content=b"x" * (BODY_LIMIT + 1), headers={"content-type": "text/plain", **bearer(KEYS[0])}
    )
    expected = f"the request body is {BODY_LIMIT + 1} bytes; this server takes at most {BODY_LIMIT}"
    assert detail(response, 413) == f"{expected} (VAE_MAX_BODY_BYTES)"
    assert response.headers["connection"] == "close"  # the rest of the body is not read


def test_streamed_body_past_the_limit_is_413(guarded: TestClient) -> None:
    chunks = (b"\0" * 1024 for _ in range(16))  # no Content-Length: sent chunked
    response = guarded.post(
        "/encode",
        content=chunks,
        headers={"content-type": "multipart/form-data; boundary=x", **bearer(KEYS[0])},
    )
    assert detail(response, 413).startswith(f"the request body is more than {BODY_LIMIT} bytes;")
    assert response.headers["connection"] == "close"


@pytest.mark.parametrize(
    ("path", "content"),
    [("/sample?format=npy", b'{"n": 4}'), ("/model", iter([b"x"])), ("/v2/models/decoder", b"{}")],
    ids=["json", "chunked", "v2"],
)
def test_a_get_with_a_body_is_400_not_answered_without_it(
    client: TestClient, path: str, content: Any
) -> None:
    """`GET /sample` with `{"n": 4}` would answer the default 16 samples: the body is refused, not ignored."""
    response = client.request("GET", path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    message = response.json().get("detail") or response.json()["error"]
    route = path.partition("?")[0]
    assert message == f"GET {route!r} takes no request body; options go in the query string (?name=value)"
    assert response.headers["connection"] == "close"
    assert client.request("GET", path, headers={"content-length": "0"}).status_code == 200
    assert client.request("GET", path, content=iter([b""])).status_code == 200  # chunked, but empty


@pytest.mark.parametrize(
    ("path", "status", "expected"),
    [
        ("/decode", 405, "Method Not Allowed"),
        ("/v2/models/decoder/infer", 405, "Method Not Allowed"),
        ("/no/such/path", 404, "Not Found"),
    ],
    ids=["post-route", "v2-post-route", "unknown"],
)
@pytest.mark.parametrize("content", [b'{"latents": [[0]]}', iter([b"x"])], ids=["length", "chunked"])
def test_a_get_with_a_body_where_no_get_is_answered_is_told_that(
    client: TestClient, path: str, status: int, expected: str, content: Any
) -> None:
    """A GET to a POST route is a 405 naming the method to use, body or not: 'takes no request body' would
    send the client after the wrong fix."""
    response = client.request("GET", path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert (response.json().get("detail") or response.json()["error"]) == expected
    if status == 405:
        assert response.headers["allow"] == "POST"


def test_body_at_the_limit_is_read(guarded: TestClient) -> None:
    body = b'{"latents": [[' + b",".join([b"0"] * 16) + b"]]}"
    padded = body + b" " * (BODY_LIMIT - len(body))  # JSON allows trailing whitespace
    response = guarded.post(
        "/decode", content=padded, headers={"content-type": "application/json", **bearer(KEYS[0])}
    )
    assert response.status_code == 200, response.text


def test_a_body_with_a_false_length_is_cut_off_unread() -> None:
    """The length says 10 bytes, the stream goes on for ever: reading stops just past the limit."""
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    app.add_middleware(guards.BodyLimit, max_bytes=BODY_LIMIT, timeout=30.0, router=app.router)
    chunks_read = 0

    async def endless() -> Message:
        nonlocal chunks_read
        chunks_read += 1
        return {"type": "http.request", "body": b"\0" * 1000, "more_body": True}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/echo",
        "raw_path": b"/echo",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-length", b"10"), (b"content-type", b"application/octet-stream")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, endless, send))
    assert sent[0]["status"] == 413
    assert b"more than 4096 bytes" in sent[1]["body"]
    assert chunks_read == BODY_LIMIT // 1000 + 1


# Work in flight


def test_requests_past_the_in_flight_limit_get_503_at_once(settings: Settings) -> None:
    """Two uploads hold both places; the next requests are refused without waiting, probes still answer,
    and the two held requests then complete."""
    app = create_app(settings.model_copy(update={"max_in_flight": 2}))

    async def scenario() -> None:
        release = asyncio.Event()

        async def slow_body() -> Any:
            yield b'{"latents": [['
            await release.wait()
            yield b",".join([b"0.5"] * 16) + b"]]}"

        async with app.router.lifespan_context(app) as state:
            transport = httpx2.ASGITransport(app=with_state(app, state))
            async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
                json_headers = {"content-type": "application/json"}
                held = [
                    asyncio.create_task(client.post("/decode", content=slow_body(), headers=json_headers))
                    for _ in range(2)
                ]
                await asyncio.sleep(0.05)  # both are inside the app, waiting for the rest of their body
                # The held uploads finish only after this: a server that queued these would never answer
                # them (the timeout turns that hang into a failure).
                requests = asyncio.gather(*(client.get("/sample?n=1") for _ in range(20)))
                refused = await asyncio.wait_for(requests, timeout=30)
                for response in refused:
                    assert response.status_code == 503
                    assert response.headers["retry-after"] == "1"
                    assert "its limit (VAE_MAX_IN_FLIGHT)" in response.json()["detail"]
                for probe in ("/ready", "/health", "/v2/health/ready", "/v2/models/decoder/ready"):
                    assert (await client.get(probe)).status_code == 200, probe
                    # A probe configured with a trailing slash is sent to the path without, busy or not.
                    slashed = await client.get(probe + "/")
                    assert (slashed.status_code, slashed.headers.get("location")) == (307, probe), probe
                assert (await client.get("/metrics/")).status_code == 307
                release.set()
                for response in await asyncio.gather(*held):
                    assert response.status_code == 200, response.text
                assert (await client.get("/sample?n=1")).status_code == 200  # the places are free again

    asyncio.run(scenario())


# Body timeout

TIMEOUT = 0.2


@pytest.mark.parametrize(
    ("url", "content_type", "start"),
    [
        ("/decode", "application/json", b'{"latents": [['),
        ("/kl", "application/json", b'{"mu": ['),
        (
            "/encode",
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="files"',
        ),
    ],
    ids=["json", "json-or-multipart", "multipart"],
)
def test_a_body_that_stalls_gets_408_and_frees_its_place(
    settings: Settings, url: str, content_type: str, start: bytes
) -> None:
    """The client sends the start of the body and then nothing: 408 after VAE_BODY_TIMEOUT, and the one place
    in flight, held meanwhile, is free again."""
    app = create_app(settings.model_copy(update={"max_in_flight": 1, "body_timeout": TIMEOUT}))

    async def scenario() -> None:
        never = asyncio.Event()

        async def stalled_body() -> Any:
            yield start
            await never.wait()  # the rest never comes

        async with app.router.lifespan_context(app) as state:
            transport = httpx2.ASGITransport(app=with_state(app, state))
            async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
                loop = asyncio.get_running_loop()
                began = loop.time()
                stalled = asyncio.create_task(
                    client.post(url, content=stalled_body(), headers={"content-type": content_type})
                )
                await asyncio.sleep(TIMEOUT / 4)
                assert (await client.get("/sample?n=1")).status_code == 503  # the stalled request holds it
                response = await asyncio.wait_for(stalled, TIMEOUT + 5)  # a failure, not a hang, without it
                assert TIMEOUT <= loop.time() - began < TIMEOUT + 1.0
                assert detail(response, 408) == (
                    f"the request body did not arrive within {TIMEOUT:g} seconds (VAE_BODY_TIMEOUT)"
                )
                assert response.headers["connection"] == "close"
                assert (await client.get("/sample?n=1")).status_code == 200  # the place is free again

    asyncio.run(scenario())


def test_a_v2_body_that_stalls_gets_408_in_the_protocols_error_shape(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"body_timeout": TIMEOUT}))

    async def scenario() -> None:
        async def stalled_body() -> Any:
            yield b'{"inputs": ['
            await asyncio.Event().wait()

        async with app.router.lifespan_context(app) as state:
            transport = httpx2.ASGITransport(app=with_state(app, state))
            async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
                posted = client.post(
                    "/v2/models/decoder/infer",
                    content=stalled_body(),
                    headers={"content-type": "application/json"},
                )
                response = await asyncio.wait_for(posted, TIMEOUT + 5)  # a failure, not a hang, without it
                assert response.status_code == 408
                assert response.json() == {
                    "error": f"the request body did not arrive within {TIMEOUT:g} seconds (VAE_BODY_TIMEOUT)"
                }

    asyncio.run(scenario())


def test_a_body_that_trickles_in_gets_408_too(settings: Settings) -> None:
    """The limit is on the whole body, not on each wait: a byte every TIMEOUT / 2 never trips a per-read
    limit, but the body as a whole is late."""
    app = create_app(settings.model_copy(update={"body_timeout": TIMEOUT}))

    async def scenario() -> None:
        async def trickle() -> Any:
            for byte in b'{"latents": [[0.5]]}':
                await asyncio.sleep(TIMEOUT / 2)
                yield bytes([byte])

        async with app.router.lifespan_context(app) as state:
            transport = httpx2.ASGITransport(app=with_state(app, state))
            async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
                json_headers = {"content-type": "application/json"}
                response = await client.post("/decode", content=trickle(), headers=json_headers)
                assert detail(response, 408).startswith("the request body did not arrive within")

    asyncio.run(scenario())


# API keys


@pytest.mark.parametrize(
    "headers",
    [bearer(KEYS[0]), {"authorization": f"bearer {KEYS[1]}"}, {"X-API-Key": KEYS[1]}],
    ids=["bearer", "bearer-lower-case", "x-api-key"],
)
def test_a_valid_key_is_let_in(guarded: TestClient, headers: dict[str, str]) -> None:
    assert guarded.get("/sample?n=1", headers=headers).status_code == 200
    assert guarded.post("/encode", files=files(digit_png(0)), headers=headers).status_code == 200


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer "}, {"Authorization": f"Basic {KEYS[0]}"}], ids=str
)
def test_no_key_is_401(guarded: TestClient, headers: dict[str, str]) -> None:
    response = guarded.get("/model", headers=headers)
    assert detail(response, 401) == (
        "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    )
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "headers",
    [bearer("wrong"), bearer(KEYS[0] + "x"), bearer(KEYS[0][:-1]), {"X-API-Key": KEYS[0].upper()}],
    ids=["other", "longer", "prefix", "case"],
)
def test_a_wrong_key_is_403(guarded: TestClient, headers: dict[str, str]) -> None:
    response = guarded.post("/decode", json=LATENTS, headers=headers)
    assert detail(response, 403) == "the API key is not valid"


def test_a_refused_key_closes_the_connection_of_a_request_with_a_body(guarded: TestClient) -> None:
    """Its body is not read: left open, the server read the rest of it and threw it away, for as long as the
    client sent (1.9 GB of a declared 100 GB without a key), outside the limits of requests let in."""
    for headers, status in [({}, 401), (bearer("wrong"), 403)]:
        response = guarded.post("/decode", json=LATENTS, headers=headers)
        assert response.status_code == status and response.headers["connection"] == "close"
        # Without a body there is nothing to drain: the connection is kept for the client's next request.
        response = guarded.get("/model", headers=headers)
        assert response.status_code == status and "connection" not in response.headers


@pytest.mark.parametrize("first", ["authorization", "x-api-key"])
def test_two_keys_must_both_be_valid(guarded: TestClient, first: str) -> None:
    """A valid key in one header does not let a wrong one in the other through, whichever comes first."""
    sent = {"authorization": f"Bearer {KEYS[0]}", "x-api-key": "wrong"}
    headers = [(name, sent[name]) for name in sorted(sent, key=lambda name: name != first)]
    response = guarded.post("/decode", json=LATENTS, headers=headers)
    assert detail(response, 403) == "an API key sent is not valid"
    both = [("authorization", f"Bearer {KEYS[0]}"), ("x-api-key", KEYS[1])]  # two valid keys
    assert guarded.post("/decode", json=LATENTS, headers=both).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    ["Bearer ", "Basic Zm9vOmJhcg==", f"Bearer{KEYS[0]}"],
    ids=["no-key", "basic", "no-space"],
)
def test_an_authorization_header_that_is_not_a_bearer_key_is_not_passed_over(
    guarded: TestClient, authorization: str
) -> None:
    """Beside a valid X-API-Key it is a credential sent, and every one sent must be valid."""
    headers = {"Authorization": authorization, "X-API-Key": KEYS[0]}
    response = guarded.post("/decode", json=LATENTS, headers=headers)
    assert detail(response, 403) == (
        "an API key sent is not valid: the Authorization header is not 'Bearer <key>'"
    )


def test_open_paths_with_a_trailing_slash_are_redirected_without_a_key(guarded: TestClient) -> None:
    """The app answers them with a 307 to the open path: a probe set to /ready/ works as /ready does."""
    for path in ("/health/", "/ready/", "/metrics/", "/v2/health/live/", "/docs/", "/openapi.json/"):
        response = guarded.get(path, follow_redirects=False)
        assert response.status_code == 307 and response.headers["location"] == path.rstrip("/"), path
    assert guarded.get("/model/", follow_redirects=False).status_code == 401  # not open: the key first


def test_probes_and_the_scrape_need_no_key(guarded: TestClient) -> None:
    probes = ("/health", "/ready", "/v2/health/live", "/v2/health/ready", "/v2/models/encoder/ready")
    for path in (*probes, "/metrics"):
        assert guarded.get(path).status_code == 200, path
    # Each model's readiness, by any name or version: the route answers, not the key check.
    assert guarded.get("/v2/models/other/ready").status_code == 404
    assert guarded.get("/v2/models/encoder/versions/1/ready").status_code == 404
    assert guarded.get("/ready", headers=bearer("wrong")).status_code == 200
    assert guarded.get("/v2/models/decoder").status_code == 401  # the rest of v2 is guarded


def test_the_api_docs_need_no_key(guarded: TestClient) -> None:
    """The docs pages load without a key; their Authorize button takes one for the requests they send."""
    assets = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js")
    for path in (
        "/docs",
        "/redoc",
        "/openapi.json",
        "/docs/oauth2-redirect",
        *(f"/docs/assets/{a}" for a in assets),
    ):
        assert guarded.get(path).status_code == 200, path
    assert guarded.get("/docs/other").status_code == 401  # the exact paths only


def test_keys_stay_out_of_repr_and_logs(
    guarded: TestClient, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    with_keys = Settings(model_dir=settings.model_dir, api_keys=",".join(KEYS))
    guarded.get("/sample?n=1", headers=bearer(KEYS[0]))
    guarded.get("/sample?n=1", headers={"X-API-Key": KEYS[1]})
    guarded.get("/sample?n=1", headers=bearer(KEYS[1] + "-wrong"))
    captured = capsys.readouterr()
    for key in KEYS:
        assert key not in repr(with_keys) and key not in str(with_keys)
        assert key not in captured.out and key not in captured.err


def test_openapi_documents_the_keys(guarded: TestClient, client: TestClient) -> None:
    schema = guarded.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    decode = schema["paths"]["/decode"]["post"]
    assert {"401", "403", "413", "503"} <= set(decode["responses"])
    assert decode["security"] == [{"bearer": []}, {"apiKey": []}]
    for probe in ("/health", "/v2/models/{model_name}/ready"):
        assert "security" not in schema["paths"][probe]["get"]
        assert not {"401", "403"} & set(schema["paths"][probe]["get"]["responses"])
    # Without keys, no security and no 401/403.
    plain = client.get("/openapi.json").json()
    assert "securitySchemes" not in plain["components"]
    assert "401" not in plain["paths"]["/decode"]["post"]["responses"]
    assert {"413", "503"} <= set(plain["paths"]["/decode"]["post"]["responses"])
    assert "413" not in plain["paths"]["/sample"]["get"]["responses"]


def test_openapi_gives_each_route_its_own_reasons_for_503(client: TestClient) -> None:
    """A model route's 503: not loaded, too busy, or stopped mid-request; liveness's: a stalled run alone."""
    paths = client.get("/openapi.json").json()["paths"]

    def reason(path: str, method: str = "get") -> str:
        return str(paths[path][method]["responses"]["503"]["description"])

    decode = reason("/decode", "post")
    assert decode.startswith("The model is not loaded yet")
    assert "VAE_MAX_IN_FLIGHT" in decode and "shutting down" in decode
    for liveness in ("/health", "/v2/health/live"):
        assert reason(liveness).startswith("A model run has not returned within VAE_STALL_TIMEOUT seconds")
        assert "not loaded" not in reason(liveness)
    for readiness in ("/ready", "/v2/health/ready", "/v2/models/{model_name}/ready"):
        assert "not loaded yet" in reason(readiness) and "VAE_STALL_TIMEOUT" in reason(readiness)
        assert "VAE_MAX_IN_FLIGHT" not in reason(readiness)  # probes are never refused for load
    client.get("/openapi.json")  # built once: asking again adds nothing
    assert reason("/decode", "post") == decode


# CORS


def test_no_cors_headers_by_default(client: TestClient) -> None:
    response = client.get("/health", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options("/decode", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_origins_from_settings(guarded: TestClient) -> None:
    # The browser's preflight carries no key; it is answered before the key check.
    preflight = guarded.options(
        "/decode",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    response = guarded.post("/decode", json=LATENTS, headers={"Origin": ORIGIN, **bearer(KEYS[0])})
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
    # HEAD, answered as GET, is allowed across origins as GET is.
    head = guarded.options(
        "/model",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "HEAD",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    assert head.status_code == 200 and "HEAD" in head.headers["access-control-allow-methods"]
    other = guarded.options(
        "/decode", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers


def test_a_page_can_use_the_binary_tensor_extension(guarded: TestClient) -> None:
    """/v2's binary tensors are framed by Inference-Header-Content-Length: a page must be let send it, and
    read it on the answer."""
    preflight = guarded.options(
        "/v2/models/decoder/infer",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "inference-header-content-length, content-type, x-api-key",
        },
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    z = {"name": "z", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}
    body = {"inputs": [z], "parameters": {"binary_data_output": True}}
    headers = {"Origin": ORIGIN, **bearer(KEYS[0])}
    response = guarded.post("/v2/models/decoder/infer", json=body, headers=headers)
    assert response.status_code == 200 and "inference-header-content-length" in response.headers
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "inference-header-content-length" in exposed


@pytest.mark.parametrize(
    ("path", "preflight", "refused"),
    [
        (
            "/decode",
            {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
            "origin 'https://evil.example' is not one of VAE_CORS_ORIGINS",
        ),
        (
            "/decode",
            {"Origin": ORIGIN, "Access-Control-Request-Method": "PUT"},
            "method 'PUT' is not allowed (GET, HEAD, POST)",
        ),
        (
            "/v2/models/decoder/infer",
            {
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, X-Trace, x-other",
            },
            "headers 'X-Trace, x-other' are not allowed (those safelisted and Authorization, Content-Type, "
            "X-API-Key, X-Request-ID, Inference-Header-Content-Length)",
        ),
        (
            "/decode",
            {
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "a,",
            },
            "headers 'a' are not allowed (those safelisted and Authorization, Content-Type, X-API-Key, "
            "X-Request-ID, Inference-Header-Content-Length); Access-Control-Request-Headers has an empty "
            "name (a stray comma)",
        ),
    ],
    ids=["origin", "method", "headers-v2", "empty-header-name"],
)
def test_a_refused_preflight_is_json_naming_what_was_refused(
    guarded: TestClient, path: str, preflight: dict[str, str], refused: str
) -> None:
    response = guarded.options(path, headers=preflight)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert "Origin" in response.headers["vary"]  # as on Starlette's own answers, for caches
    key = "error" if path.startswith("/v2") else "detail"
    assert response.json() == {key: f"CORS preflight refused: {refused}"}
