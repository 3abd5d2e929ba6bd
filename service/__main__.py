"""`python -m service --host H --port P`: the service under uvicorn, as `make serve` and the image run it.

Settings come from the environment (`VAE_*`) and are checked before anything loads: a bad one ends the
process with its message and exit status 2. A model that cannot be served ends it with status 3 (uvicorn's
"startup failed"). On SIGTERM or Ctrl-C, uvicorn stops accepting connections, lets the requests in flight
finish for at most VAE_DRAIN_TIMEOUT seconds (then cancels them, as a second Ctrl-C does at once), runs the
app's shutdown, and the process exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from types import FrameType

__all__ = ["main"]

# uvicorn's exit status for an app that failed to start.
STARTUP_FAILED = 3
BAD_SETTINGS = 2


# The stop signals that arrived while the modules were being imported.
_arrived: list[int] = []


def _note(signum: int, frame: FrameType | None) -> None:
    """SIGTERM or Ctrl-C during the imports: noted, and acted on once they are done. Raised in the middle of
    one, SystemExit came out of onnxruntime's native module as `ImportError: initialization failed`, with a
    traceback and exit status 1."""
    _arrived.append(signum)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """SIGTERM or Ctrl-C outside uvicorn's own handling: before it starts, or re-raised by it after a graceful
    stop."""
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    # From the first moment, before the imports below (uvicorn, pydantic: a few tenths of a second), so that
    # an orchestrator stopping a process that has just started sees it exit 0, not killed by the signal.
    # uvicorn handles SIGTERM and SIGINT while it serves, then raises them again with the handlers it found:
    # these, so that a graceful stop exits 0 too. (Python's own SIGINT handler printed a KeyboardInterrupt
    # traceback for a Ctrl-C in those first tenths of a second, and the process died by the signal.)
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _note)
    import uvicorn
    from pydantic import ValidationError

    from service.api.middleware import STOPPING
    from service.config import get_settings, misspelt_settings

    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _exit_cleanly)
    if _arrived:
        return 0

    class Server(uvicorn.Server):
        """uvicorn's server, which tells the app when it begins to stop (see `STOPPING`)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            STOPPING.set()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)
            # Ctrl-C again during the drain: uvicorn stops waiting for the requests in flight and skips the
            # app's shutdown, which then died with them at the exit, in an ERROR record. The requests are
            # cancelled (their clients get a 503), and the shutdown still runs, unless uvicorn ran it (the
            # Ctrl-C came during it). It waits for a model run in progress, 5 s at most for each graph.
            shut_down = getattr(self.lifespan, "shutdown_event", None)
            if self.force_exit and shut_down is not None and not shut_down.is_set():
                for task in self.server_state.tasks:
                    task.cancel()
                await self.lifespan.shutdown()

    parser = argparse.ArgumentParser(prog="python -m service", description="Serve the VAE service.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as error:
        # One line per bad variable, without the values (VAE_API_KEYS is one of them).
        for problem in error.errors(include_url=False, include_input=False):
            name = f"VAE_{str(problem['loc'][0]).upper()}" if problem["loc"] else "settings"
            print(f"invalid setting {name}: {problem['msg']}", file=sys.stderr)
        # A misspelt variable may be why (VAE_MODEL_DIRS leaves VAE_MODEL_DIR at its default).
        for variable, setting in misspelt_settings(os.environ):
            print(f"{variable} is not a setting, and is ignored: did you mean {setting}?", file=sys.stderr)
        return BAD_SETTINGS
    # The factory, as `uvicorn --factory` takes it: uvicorn sets up its logging first, then the app its own.
    # It gets the settings just read (get_settings() reads the environment once).
    config = uvicorn.Config(
        "service.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=settings.drain_timeout,
        timeout_keep_alive=settings.keep_alive_timeout,
    )
    server = Server(config)
    server.run()
    return 0 if server.started else STARTUP_FAILED


if __name__ == "__main__":
    sys.exit(main())
