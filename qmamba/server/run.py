"""Run the app under uvicorn with a shutdown that ends every request properly.

uvicorn alone, on SIGTERM / Ctrl-C, waits for every open request, queued ones included, however long they take;
on a second Ctrl-C it cancels the handlers (clients get a bare 500 or a cut stream) and skips the app's shutdown,
leaving the engine thread inside the backend at interpreter exit (which can abort the process). Here a shutdown
takes no new connections or requests, lets the open ones finish for up to `shutdown_timeout` seconds (less on a
second signal), then stops the engine, which ends what is left with a 503 / an SSE error event, and gives the
handlers a moment to send that before uvicorn closes the connections.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from fastapi import FastAPI

from qmamba.server.engine import Engine

log = logging.getLogger("uvicorn.error")

HANDLER_GRACE_S = 2.0  # for the handlers to send the error events of a stopped engine


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, shutdown_timeout: float | None = 30.0) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        # uvicorn internals (servers, server_state.tasks, lifespan) are read with getattr: on a uvicorn without them
        # this degrades to uvicorn's own shutdown instead of failing
        for server in getattr(self, "servers", ()):  # no new connections while the engine drains
            server.close()
        self.engine.begin_shutdown()  # new requests on open connections: 503
        end = None if self.shutdown_timeout is None else loop.time() + self.shutdown_timeout
        if not self.engine.idle and not self.force_exit:
            log.info("Finishing %d running and %d queued request(s)%s", self.engine.active, self.engine.queued,
                     "" if end is None else f" (up to {self.shutdown_timeout:g} s)")
        while not self.engine.idle and not self.force_exit and (end is None or loop.time() < end):
            await asyncio.sleep(0.05)
        if not self.engine.idle:
            log.warning("Ending %d unfinished request(s) with an error", self.engine.active + self.engine.queued)
        await asyncio.to_thread(self.engine.stop)
        grace = loop.time() + HANDLER_GRACE_S
        while getattr(self.server_state, "tasks", None) and loop.time() < grace:
            await asyncio.sleep(0.02)
        await super().shutdown(sockets)
        lifespan = getattr(self, "lifespan", None)
        if self.force_exit and lifespan is not None:  # uvicorn skips the app's shutdown then
            await lifespan.shutdown()


def serve(app: FastAPI, engine: Engine, host: str, port: int, shutdown_timeout: float | None = 30.0,
          log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM; the engine is stopped on every way out."""
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level), engine, shutdown_timeout)
    try:
        server.run()
    finally:
        engine.stop()
