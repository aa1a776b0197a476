"""`moss-tts serve`: one process, one device's `Engine`, served over HTTP and WebSocket.

The token is a shared secret from `MOSS_SERVER_TOKEN` or a file; the server refuses to start
without one (`core.server.auth`). It binds 127.0.0.1 unless told otherwise (TLS is the ingress's job). On SIGTERM
uvicorn stops accepting connections and lets open sockets close; then the engine closes, which
ends any stream still running with `EngineClosed` (a clear reason on the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8765
    token_file: Path | None = None
    graceful_s: float = 30.0  # open sockets get this long to finish after SIGTERM


def serve(engine: object, options: ServeOptions, token: str) -> None:
    """Serve `engine` until SIGTERM/SIGINT, then close it (blocking)."""
    import uvicorn

    from core.server.app import create_app

    app = create_app(engine, token=token)  # type: ignore[arg-type]
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="info",
                            timeout_graceful_shutdown=int(options.graceful_s), ws="websockets-sansio")
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the previous
    # handler: make that a no-op, so the engine below is closed and the exit code is 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.close()  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def serving(engine: object, *, token: str, limits: object | None = None,
                  host: str = "127.0.0.1", port: int = 0,
                  start_timeout_s: float = 30.0) -> AsyncIterator[str]:
    """Serve `engine` on this event loop (port 0: a free one) and yield its URL; stop on exit.

    For an engine embedded in a larger asyncio application, and for tests and benchmarks.
    """
    import uvicorn

    from core.server.app import create_app

    app = create_app(engine, token=token, limits=limits)  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           ws="websockets-sansio", lifespan="off"))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            server.should_exit = True
            await task  # its own error, if it failed
            raise RuntimeError(f"the server did not start within {start_timeout_s:g} s")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
