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
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

from service import request_id

__all__ = ["NativeLog", "access_log", "configure_logging", "native_stderr"]

# One line per answered request; its level is INFO.
access_log = logging.getLogger("service.access")

# ONNX Runtime's own log lines: "<time> [W:onnxruntime:<logger>, <file:line> <function>] <message>", coloured.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NATIVE = re.compile(r"^\S+ \S+ \[(?P<severity>[VIWEF]):onnxruntime:[^\]]*\] (?P<message>.*)$")
_CAPTURE_TURN = threading.RLock()
# Longest message relayed, in characters; the rest of a longer one is dropped.
_MAX_MESSAGE = 16 * 1024
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


@dataclass
class NativeLog:
    """What native code wrote to stderr inside a `native_stderr` block."""

    # Every line's message, in order, repeats included.
    messages: list[str] = field(default_factory=list)
    # ONNX Runtime's ERROR and FATAL messages, in order: for the caller's own error when the work failed.
    errors: list[str] = field(default_factory=list)
    # Each (level, message) already logged: a message repeated (once per graph, say) is logged once.
    seen: set[tuple[int, str]] = field(default_factory=set)


@contextmanager
def native_stderr(logger: logging.Logger) -> Iterator[NativeLog]:
    """Relay ONNX Runtime's log lines, written to file descriptor 2 inside the block, as records of
    `logger`, line by line as they come, each message once, at ONNX Runtime's severity up to WARNING (an
    error the work carried on from, a CUDA provider that could not start while the CPU may run the model,
    is a warning here; one that stops it also raises, and `NativeLog.errors` has its text for the caller's
    error). Any other line goes on to stderr as it was (a log handler writing to stderr included).

    The descriptor is the process's: keep the block to startup work. Blocks take turns. Where stderr is
    closed the block runs without the relay.
    """
    said = NativeLog()
    try:
        os.fstat(2)
    except OSError:
        yield said
        return
    with _CAPTURE_TURN:
        if sys.stderr is not None:
            sys.stderr.flush()
        stderr = os.dup(2)
        read_end, write_end = os.pipe()
        relay = threading.Thread(
            target=_relay, args=(read_end, stderr, logger, said), name="native-stderr", daemon=True
        )
        relay.start()
        try:
            try:
                os.dup2(write_end, 2)
            finally:
                os.close(write_end)  # fd 2 holds the pipe's write end now
            yield said
        finally:
            os.dup2(stderr, 2)  # closes the last write end: the relay reads to the end and stops
            relay.join()
            os.close(stderr)


def _relay(read_end: int, stderr: int, logger: logging.Logger, said: NativeLog) -> None:
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                _relay_line(line, stderr, logger, said)
        if pending:
            _relay_line(pending, stderr, logger, said)


def _relay_line(raw: bytes, stderr: int, logger: logging.Logger, said: NativeLog) -> None:
    try:
        _relay_one(raw, stderr, logger, said)
    except Exception:  # the relay must keep draining the pipe whatever a line does, or its writer blocks
        pass


def _relay_one(raw: bytes, stderr: int, logger: logging.Logger, said: NativeLog) -> None:
    text = _ANSI.sub("", raw.decode("utf-8", errors="replace")).strip()
    match = _NATIVE.match(text)
    if match is None:
        if text:  # not ONNX Runtime's: on to stderr as it came (a blank line or a colour reset: dropped)
            os.write(stderr, raw + b"\n")
        return
    message = match["message"][:_MAX_MESSAGE]
    said.messages.append(message)
    if match["severity"] in ("E", "F"):
        said.errors.append(message)
    key = (min(_SEVERITY.get(match["severity"], logging.WARNING), logging.WARNING), message)
    if key not in said.seen:
        said.seen.add(key)
        logger.log(*key)


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
