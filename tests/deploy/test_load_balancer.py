"""Two service processes behind a real nginx on loopback, running the load balancer's own configuration
(deploy/nginx/load-balancer.conf, which docker-compose.yml mounts): requests spread over both replicas, a
seeded request gets the same bytes whichever replica answers, and a replica that is gone is skipped.

The replicas run the image's CMD (from the Dockerfile) on the CPU; nginx is Debian's (`apt-get install
nginx`, as .ci/run does), started here with a configuration of its own under the test's temporary directory.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_MODEL, REPO
from tests.deploy.compose import load
from tests.deploy.dockerfile import parse
from tests.deploy.nginx import CONF, directives, loopback, main_config

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="no nginx binary (apt-get install nginx)"),
]

# Bounds: a replica loads and warms the default model in a few seconds on 2 cores; nginx starts at once.
READY_TIMEOUT_S = 60
NGINX_TIMEOUT_S = 10
STOP_TIMEOUT_S = 20
REQUEST_TIMEOUT_S = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def upstream(self) -> str:
        """The replica that answered, as nginx's $upstream_addr (`a, b` when `a` failed first)."""
        return self.headers.get("X-Upstream", "")


def request(port: int, method: str, path: str, body: bytes | None = None, **headers: str) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request(
            method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()}
        )
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def wait_ready(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if request(port, "GET", "/ready").status == 200:
                return
        except OSError:
            pass
        assert process.poll() is None, f"exited with {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"/ready not 200 within {timeout} s:\n{log.read_text()}"
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL to the process group it leads if it has not exited in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def compose_api_environment() -> dict[str, str]:
    environment: dict[str, str] = load(REPO / "docker-compose.yml")["services"]["api"]["environment"]
    return environment


def replica_argv(port: int) -> list[str]:
    """The image's CMD, run with this interpreter and on loopback instead of all interfaces."""
    argv = parse(REPO / "Dockerfile").stages["runtime"].one("CMD").exec_form()
    assert argv[0] == "python" and argv[argv.index("--host") + 1] == "0.0.0.0"
    argv[0] = sys.executable
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    return argv


class Replicas(list[str]):
    """The replicas' `127.0.0.1:port` addresses, and the files their output goes to."""

    logs: list[Path]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Two replicas of the service on free loopback ports, as compose configures `api` (on the CPU)."""
    work = tmp_path_factory.mktemp("replicas")
    env = {key: value for key, value in os.environ.items() if not key.startswith("VAE_")}
    # No GPU here; one ONNX Runtime thread each, so the two share the machine's cores without contention.
    env |= {
        "VAE_MODEL_DIR": str(DEFAULT_MODEL),
        "VAE_PROVIDERS": "CPUExecutionProvider",
        "VAE_INTRA_OP_THREADS": "1",
        "FORWARDED_ALLOW_IPS": compose_api_environment()["FORWARDED_ALLOW_IPS"],
    }
    started: list[tuple[int, subprocess.Popen[bytes], Path]] = []
    try:
        for index in range(2):
            port, log = free_port(), work / f"replica-{index}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    replica_argv(port),
                    cwd=REPO,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started.append((port, process, log))
        for port, process, log in started:
            wait_ready(port, process, log, READY_TIMEOUT_S)
        addresses = Replicas(f"127.0.0.1:{port}" for port, _, _ in started)
        addresses.logs = [log for _, _, log in started]
        yield addresses
    finally:
        for _, process, _ in started:
            stop(process)


@contextmanager
def balancer(upstreams: Sequence[str], prefix: Path) -> Iterator[int]:
    """nginx with the deployed configuration in front of `upstreams`; yields the port it listens on."""
    assert NGINX is not None
    prefix.mkdir()
    port = free_port()
    site = prefix / CONF.name
    site.write_text(loopback(CONF.read_text(), upstreams, port))
    conf = prefix / "nginx.conf"
    conf.write_text(main_config(prefix, site))
    log = prefix / "error.log"
    argv = [NGINX, "-e", str(log), "-p", str(prefix), "-c", str(conf)]
    checked = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=NGINX_TIMEOUT_S)
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + NGINX_TIMEOUT_S
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert process.poll() is None, f"nginx exited with {process.returncode}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"nginx not listening within {NGINX_TIMEOUT_S} s"
                time.sleep(0.05)
        yield port
    finally:
        stop(process)


@pytest.fixture(scope="module")
def lb(replicas: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The load balancer in front of both replicas: its port."""
    with balancer(replicas, tmp_path_factory.mktemp("lb") / "nginx") as port:
        yield port


def until_both_answer(
    lb: int, replicas: list[str], method: str, path: str, body: bytes | None = None
) -> dict[str, bytes]:
    """The same request sent until each replica has answered it: the body each one gave."""
    bodies: dict[str, bytes] = {}
    for _ in range(4 * len(replicas)):
        reply = request(lb, method, path, body, content_type="application/json")
        assert reply.status == 200, reply.body
        bodies.setdefault(reply.upstream, reply.body)
        if bodies.keys() == set(replicas):
            return bodies
    raise AssertionError(f"{method} {path} reached only {sorted(bodies)} of {replicas}")


def test_requests_spread_over_both_replicas(lb: int, replicas: list[str]) -> None:
    answered = Counter(request(lb, "GET", f"/sample?n=1&seed={seed}").upstream for seed in range(8))
    # Round-robin: one after the other, so eight requests in a row are four each.
    assert answered == {replicas[0]: 4, replicas[1]: 4}


@pytest.mark.parametrize(
    "path",
    ["/sample?n=4&seed=7", "/sample?n=4&seed=7&format=grid&scale=2", "/sample?n=3&seed=7&format=array"],
    ids=["sample-json", "sample-grid", "sample-array"],
)
def test_seeded_samples_are_byte_identical_on_every_replica(lb: int, replicas: list[str], path: str) -> None:
    bodies = until_both_answer(lb, replicas, "GET", path)
    assert len(set(bodies.values())) == 1


def test_seeded_encode_draws_are_byte_identical_on_every_replica(lb: int, replicas: list[str]) -> None:
    digit = request(lb, "GET", "/sample?n=1&seed=1&format=grid").body
    body = json.dumps({"images": [base64.b64encode(digit).decode("ascii")]}).encode()
    bodies = until_both_answer(lb, replicas, "POST", "/encode?samples=3&seed=11", body)
    assert len(set(bodies.values())) == 1
    assert len(json.loads(next(iter(bodies.values())))["z"][0]) == 3
    # The seed is what makes them equal: another seed draws other z.
    other = request(lb, "POST", "/encode?samples=3&seed=12", body, content_type="application/json")
    assert other.status == 200 and other.body not in bodies.values()


def test_a_replica_that_is_gone_is_skipped(replicas: list[str], tmp_path: Path) -> None:
    # A second balancer over one live replica and an address where nothing listens (a stopped replica).
    gone = f"127.0.0.1:{free_port()}"
    with balancer([gone, replicas[0]], tmp_path / "nginx") as port:
        replies = [request(port, "GET", "/sample?n=1&seed=0") for _ in range(4)]
    assert [reply.status for reply in replies] == [200] * 4
    assert len({reply.body for reply in replies}) == 1
    # The first request tried the gone one, then went on (nginx lists both); after that nginx leaves the
    # failed one out for its fail_timeout (1 s).
    assert replies[0].upstream == f"{gone}, {replicas[0]}"
    assert {reply.upstream for reply in replies[1:]} == {replicas[0]}


class _Busy(http.server.BaseHTTPRequestHandler):
    """A replica at its VAE_MAX_IN_FLIGHT: 503 with Retry-After to every request."""

    def do_GET(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(503)
        self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_busy_replica_passes_gets_on_and_hands_posts_back(replicas: list[str], tmp_path: Path) -> None:
    """A GET that a replica refuses with 503 (busy, or still loading) goes to the next one; a POST it has
    received comes back to the client as its 503, with Retry-After, and is not sent to another replica."""
    busy = http.server.HTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{busy.server_address[1]}"
    body = json.dumps({"latents": [[0.0] * 16]}).encode()
    try:
        # One balancer for both: a replica that answered 503 is left out for its Retry-After, 1 s
        # (fail_timeout; nginx's default of 10 s sent both POSTs to the other one).
        with balancer([address, replicas[0]], tmp_path / "nginx") as port:
            gets = [request(port, "GET", "/sample?n=1&seed=0") for _ in range(2)]
            time.sleep(2.5)  # nginx counts fail_timeout in whole seconds of its clock: 1 s is up to 2
            # nginx brings a peer back at a weight that rises with each pick: within a few requests.
            posts = [
                request(port, "POST", "/decode", body, content_type="application/json") for _ in range(6)
            ]
    finally:
        busy.shutdown()
        busy.server_close()
    assert [reply.status for reply in gets] == [200, 200]
    # Round-robin: one of the two went to the busy replica first, then on.
    assert sorted(reply.upstream for reply in gets) == sorted([f"{address}, {replicas[0]}", replicas[0]])
    # A POST that reached the busy replica has its 503 as the answer; the others went to the live one.
    assert (503, address) in [(reply.status, reply.upstream) for reply in posts]
    assert {(reply.status, reply.upstream) for reply in posts} == {(200, replicas[0]), (503, address)}
    assert all(reply.headers["Retry-After"] == "1" for reply in posts if reply.status == 503)


def test_replicas_all_busy_are_a_503_with_retry_after_not_a_502(tmp_path: Path) -> None:
    """Every replica at its VAE_MAX_IN_FLIGHT: each refusal leaves that replica out for 1 s, and nginx then
    finds none left ("no live upstreams"). That was a 502 saying no replica could be reached, without
    Retry-After: under load clients read it as an outage and retried at once, harder."""
    servers = [http.server.HTTPServer(("127.0.0.1", 0), _Busy) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        addresses = [f"127.0.0.1:{server.server_address[1]}" for server in servers]
        with balancer(addresses, tmp_path / "nginx") as port:
            replies = [request(port, "GET", "/sample?n=1") for _ in range(3)]
            replies += [request(port, "POST", "/decode", b"{}", content_type="application/json")]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert [(reply.status, reply.headers["Retry-After"]) for reply in replies] == [(503, "1")] * 4
    # The first went to both replicas and has the last one's answer; the rest were the balancer's own.
    assert ", " in replies[0].upstream
    assert "busy" in json.loads(replies[1].body)["detail"]


def test_errors_of_the_balancer_itself_are_json(tmp_path: Path) -> None:
    with balancer([f"127.0.0.1:{free_port()}"], tmp_path / "nginx") as port:
        none_up = request(port, "GET", "/ready", X_Request_ID="client-7")
        # Content-Length beyond client_max_body_size: refused from the header, the body is never read.
        too_large = request(port, "POST", "/encode", b"", content_length=str(16 * 1024 * 1024 + 1))
        forged = request(port, "GET", "/ready", X_Request_ID="two words")
    assert none_up.status == 503 and "replica" in json.loads(none_up.body)["detail"]
    assert none_up.headers["Retry-After"] == "1"
    assert too_large.status == 413 and "client_max_body_size" in json.loads(too_large.body)["detail"]
    # The request id, as the service answers it: the client's, or one of the balancer's own where the
    # client sent none or one the service would not take.
    assert none_up.headers["X-Request-ID"] == "client-7"
    for reply in (too_large, forged):
        assert re.fullmatch(r"[0-9a-f]{32}", reply.headers["X-Request-ID"]), reply.headers


def test_a_client_that_never_finishes_its_headers_is_cut_off(lb: int) -> None:
    """uvicorn would hold the connection open for as long as the client likes (slowloris); the balancer
    closes it after client_header_timeout. It buffers bodies, so it bounds their pauses too (VAE_BODY_TIMEOUT
    never sees them), and idle client connections (the upstream's keepalive_timeout is the replicas')."""
    text = CONF.read_text()
    assert directives(text, "client_header_timeout") == [["10s"]]
    assert directives(text, "client_body_timeout") == [["10s"]]
    assert ["15s"] in directives(text, "keepalive_timeout")
    with socket.create_connection(("127.0.0.1", lb), timeout=30) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert sock.recv(1024) == b""  # closed by the balancer, without an answer
        assert 9 < time.monotonic() - start < 20


def test_the_access_log_names_the_client_not_a_forged_forwarded_for(lb: int, replicas: Replicas) -> None:
    """The replicas trust the balancer's X-Forwarded-For (FORWARDED_ALLOW_IPS, as compose sets it); the
    balancer writes the address it sees there, so a client cannot put another one in the log."""
    reply = request(lb, "GET", "/model", X_Forwarded_For="203.0.113.7", X_Request_ID="forged-forwarded-for")
    assert reply.status == 200
    deadline = time.monotonic() + REQUEST_TIMEOUT_S  # the line is written once the answer has gone out
    while True:
        lines = [line for log in replicas.logs for line in log.read_text().splitlines()]
        logged = [json.loads(line) for line in lines if '"forged-forwarded-for"' in line]
        if logged or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [line["client"] for line in logged] == ["127.0.0.1"]
