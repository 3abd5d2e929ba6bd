"""The request id: taken from the `X-Request-ID` header or generated, returned in the same header, and logged.

`accept(raw)` is called once per request by the request middleware, which also makes the id the current
one; `current()` is that id, for log lines and error bodies written while the request is handled.
"""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar

__all__ = ["HEADER", "accept", "current", "generate"]

HEADER = "X-Request-ID"
# What a caller's id may look like: short, and nothing that could forge a log line or a header.
_ACCEPTABLE = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")

_current: ContextVar[str | None] = ContextVar("request_id", default=None)


def generate() -> str:
    """A fresh id: 32 random hex digits."""
    return secrets.token_hex(16)


def accept(raw: bytes | None) -> str:
    """The caller's `X-Request-ID` value if it is acceptable, else a fresh id; it becomes the current id."""
    request_id = raw.decode("ascii") if raw is not None and _ACCEPTABLE.fullmatch(raw) else generate()
    _current.set(request_id)
    return request_id


def current() -> str | None:
    """The id of the request being handled, or None outside a request."""
    return _current.get()
