"""Structured logs: every record of the process (uvicorn's included) as one JSON object per line on stdout.

Each line has `time` (UTC, RFC 3339), `level`, `logger` and `message`, the `request_id` of the request being
handled when there is one, and the record's extra fields; the access log (`service.access`, one line per
request, written by the request middleware) adds `method`, `path`, `route`, `status`, `duration_ms` and
`client`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

from service import request_id

__all__ = ["access_log", "configure_logging", "native_stderr", "relay_native_log"]

# One line per answered request; its level is INFO.
access_log = logging.getLogger("service.access")

# ONNX Runtime's own log lines: "<time> [W:onnxruntime:<logger>, <file:line> <function>] <message>", coloured.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NATIVE = re.compile(r"^\S+ \S+ \[(?P<severity>[VIWEF]):onnxruntime:[^\]]*\] (?P<message>.*)$")
_CAPTURE_TURN = threading.Lock()
_SEVERITY = {"V": logging.DEBUG, "I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR}


class _RequestIdFilter(logging.Filter):
    """Adds the current request id to records that do not carry one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            current = request_id.current()
            if current is not None:
                record.request_id = current
        return True


class _StdoutHandler(logging.Handler):
    """Writes each record to whatever `sys.stdout` is at the time (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # logging must never take the request down; the logging module reports it
            self.handleError(record)


@contextmanager
def native_stderr() -> Iterator[list[str]]:
    """The lines native code (ONNX Runtime's logger) writes to file descriptor 2 inside the block.

    The descriptor is the process's: keep the block to startup work, where no other thread writes to it.
    Blocks in several threads take turns (one restoring the descriptor while another holds it would leave
    it pointing at a closed capture).
    """
    lines: list[str] = []
    with _CAPTURE_TURN, tempfile.TemporaryFile(mode="w+b") as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = _ANSI.sub("", capture.read().decode("utf-8", errors="replace"))
            lines.extend(line for line in text.splitlines() if line.strip())


def relay_native_log(lines: list[str], logger: logging.Logger) -> None:
    """Log what `native_stderr` caught as JSON records, each message once, at ONNX Runtime's own severity
    up to WARNING: an error that stops the work raises too, and the caller reports that; one it carried on
    from (a CUDA provider that could not start, when the CPU may run the model) is a warning here."""
    records: dict[tuple[int, str], None] = {}
    for line in lines:
        match = _NATIVE.match(line)
        if match is None:
            records[logging.WARNING, line] = None
        else:
            level = min(_SEVERITY.get(match["severity"], logging.WARNING), logging.WARNING)
            records[level, match["message"]] = None
    for level, message in records:
        logger.log(level, "%s", message)


def configure_logging() -> None:
    """Send every logger's records, as JSON lines, to stdout through one handler on the root logger.

    uvicorn's own handlers are removed (its loggers propagate to the root instead) and its access log is
    silenced: the request middleware writes the access log, with the request id. Calling this again changes
    nothing.
    """
    root = logging.getLogger()
    if not any(isinstance(handler, _StdoutHandler) for handler in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(
            OrjsonFormatter(
                "{levelname}{name}{message}",
                style="{",
                rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
                # uvicorn repeats its messages with terminal colour codes in `color_message`.
                reserved_attrs=[*RESERVED_ATTRS, "color_message"],
                timestamp="time",
            )
        )
        handler.addFilter(_RequestIdFilter())
        root.addHandler(handler)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("service").setLevel(logging.INFO)
    # Python warnings (Pillow's about odd files, say) as records of the "py.warnings" logger: JSON lines too.
    logging.captureWarnings(True)
