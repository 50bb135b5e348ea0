"""Run the API under uvicorn, and shut down in order: SIGTERM (or Ctrl-C) drains, then exits 0.

On the first SIGTERM/SIGINT the server stops taking requests (new ones get 503, /health says draining), lets the
requests in flight finish for up to `drain_timeout_s`, ends the rest with an error event or a 503 body, then
closes its connections and stops the engine's processes. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

import uvicorn

from ferry.serve.app import ServerState, create_app

log = logging.getLogger("ferry.serve")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.ferry, self.drain_timeout_s = state, drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready_line = ""

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self.ferry.engine.start()
        await super().serve(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # listening, with the signal handlers in place: a SIGTERM from now on drains
            print(self.ready_line, file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        if self.ferry.draining or self._loop is None:
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self.ferry.draining = True
        log.warning("signal %d: draining %d requests (at most %g s), then exiting", sig, self.ferry.engine.in_flight,
                    self.drain_timeout_s)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        cut = await self.ferry.engine.drain(self.drain_timeout_s)
        if cut:
            log.warning("drain limit reached: ended %d requests with an error", cut)
        await asyncio.sleep(0.1)  # let the handlers write their last events before the connections close
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from ferry.errors import FerryError

        raise FerryError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)  # connections made before uvicorn starts wait in the backlog instead of being refused
    return sock


def run_server(state: ServerState, host: str, port: int, drain_timeout_s: float = 30.0,
               exit_on_engine_failure: bool = False) -> None:
    """Serve until a signal (or, with `exit_on_engine_failure`, until the engine stops); the caller closes the
    engine afterwards."""
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off",
                            timeout_keep_alive=5, timeout_graceful_shutdown=5)
    server = _DrainingServer(config, state, drain_timeout_s)
    if exit_on_engine_failure:
        state.engine.on_failure.append(lambda _: setattr(server, "should_exit", True))
    shown = f"[{host}]" if ":" in host else host
    # Tests and scripts read this line for the port (port 0 picks a free one).
    server.ready_line = f"ferry: serving {state.model.name} on http://{shown}:{bound}/v1"
    server.run(sockets=[sock])
