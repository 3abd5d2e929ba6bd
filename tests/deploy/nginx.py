"""The load balancer's nginx configuration (deploy/nginx/load-balancer.conf): its directives, and the same
file made runnable on this machine, in front of replicas on loopback."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import REPO

__all__ = ["CONF", "directives", "loopback", "main_config"]

CONF = REPO / "deploy" / "nginx" / "load-balancer.conf"

# The upstream server and the listen directive that `loopback` replaces (one of each in the file).
_UPSTREAM_SERVER = re.compile(r"^(\s*)server\s+([^;{]+);", re.MULTILINE)
_LISTEN = re.compile(r"^(\s*)listen\s+[^;]+;", re.MULTILINE)


def _without_comments(text: str) -> str:
    return re.sub(r"#[^\n]*", "", text)


def directives(text: str, name: str) -> list[list[str]]:
    """The arguments of every simple `name ...;` directive (not of blocks like `server { ... }`), quoted
    strings kept whole (`return 413 '...'`)."""
    pattern = re.compile(rf"^\s*{re.escape(name)}\s+((?:[^;{{}}'\"]|'[^']*'|\"[^\"]*\")*);", re.MULTILINE)
    return [shlex.split(match[1]) for match in pattern.finditer(_without_comments(text))]


def loopback(text: str, upstreams: Sequence[str], port: int) -> str:
    """The configuration with its upstream server replaced by `upstreams` (`host:port` each) and listening
    on 127.0.0.1:`port`; everything else is left as deployed."""
    upstream_block = re.search(r"upstream\s+\w+\s*\{[^}]*\}", text)
    assert upstream_block, "the configuration has no upstream block"
    block = upstream_block[0]
    ((_, deployed),) = _UPSTREAM_SERVER.findall(_without_comments(block))  # one upstream server
    # Its parameters stay (max_fails=0 ...), but for `resolve`: the addresses here are IPs.
    parameters = "".join(f" {word}" for word in deployed.split()[1:] if word != "resolve")
    servers = "".join(f"\\1server {address}{parameters};\n" for address in upstreams).rstrip("\n")
    block = _UPSTREAM_SERVER.sub(servers, block)
    text = text.replace(upstream_block[0], block)
    text, listens = _LISTEN.subn(rf"\1listen 127.0.0.1:{port};", text)
    assert listens == 1, f"expected one listen directive, found {listens}"
    return text


def main_config(prefix: Path, include: Path) -> str:
    """A main nginx.conf that keeps everything under `prefix` and runs in the foreground, with `include`
    inside its `http` block (as the nginx image includes conf.d/*.conf)."""
    # As root, nginx would run its workers as `nobody`, who can't enter pytest's private temporary
    # directory; elsewhere the directive is not needed (and nginx ignores it).
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp_paths = "".join(
        f"    {kind}_temp_path {prefix / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        "daemon off;\n"
        "worker_processes 1;\n"
        f"{user}"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} notice;\n"
        "events {\n    worker_connections 64;\n}\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        f"{temp_paths}"
        "    # Which replica answered ($upstream_addr): for the test only, not in the deployed file.\n"
        "    add_header X-Upstream $upstream_addr always;\n"
        f"    include {include};\n"
        "}\n"
    )
