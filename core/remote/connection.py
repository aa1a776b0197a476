"""One conversation socket, run in the background on the caller's asyncio loop.

Synchronous calls (`speak`, `push_text`, `stop`, ...) only queue frames; one task opens the
socket, sends the queued frames in order and hands every received message (with the binary
frame it announced) to the conversation. The end of the socket, for whatever reason, is
reported once, with the error the conversation's open turns should end with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core import wire
from core.errors import ProtocolError, StreamFailed

# A frame, or a coroutine function producing frames (user audio read off the loop's thread).
Outgoing = str | bytes | Callable[[], Awaitable[list[str | bytes]]]
OnMessage = Callable[[dict[str, Any], bytes | None], None]
OnClosed = Callable[[BaseException | None], None]
CLOSE_WAIT_S = 5.0  # after `close`, how long the server gets to close the socket itself
MAX_INCOMING_BYTES = 16 << 20
SESSION_HEADER = "x-session-id"  # what a sticky router (Ray Serve's consistent hash) keys on

_ANNOUNCES_BINARY = {"chunk": "bytes", "past": "bytes"}


class Connection:
    """A lazily opened WebSocket with an ordered outgoing queue."""

    def __init__(self, url: str, token: str, on_message: OnMessage, on_closed: OnClosed, *,
                 session_id: str, open_timeout_s: float = 10.0) -> None:
        self._url, self._token, self._open_timeout_s = url, token, open_timeout_s
        self._headers = {"Authorization": f"Bearer {token}", SESSION_HEADER: session_id}
        self._on_message, self._on_closed = on_message, on_closed
        self._out: deque[Outgoing] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._ended = False

    @property
    def ended(self) -> bool:
        """The socket is gone (or was closed before it opened): nothing more goes out."""
        return self._ended

    def send(self, *items: Outgoing) -> None:
        """Queue frames (or a frame factory) to go out after everything queued before."""
        if self._closing or self._ended:  # nobody will send them
            return
        self._out.extend(items)
        if self._wake is not None:
            self._wake.set()

    def start(self) -> None:
        """Open the socket on the running loop (RuntimeError without one); idempotent."""
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._wake.set()
            self._task = loop.create_task(self._run())

    def close(self) -> None:
        """Send what is queued, then close (the queue should end with a `close` message)."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        elif not self._ended:  # never started: nothing to send, nothing to wait for
            self._ended = True

    def abort(self) -> None:
        """Drop the socket now (the conversation's owner is gone)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()

    async def wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    # -- the task ---------------------------------------------------------------------------
    async def _run(self) -> None:
        error: BaseException | None = None
        try:
            async with connect(self._url, additional_headers=self._headers, compression=None,
                               proxy=None,
                    open_timeout=self._open_timeout_s, max_size=MAX_INCOMING_BYTES) as ws:
                reader = asyncio.create_task(self._read(ws))
                writer = asyncio.create_task(self._write(ws))
                try:
                    await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
                    if writer.done() and not reader.done():  # `close` sent: the server ends it
                        await asyncio.wait({reader}, timeout=CLOSE_WAIT_S)
                finally:
                    for task in (reader, writer):
                        task.cancel()
                    results = await asyncio.gather(reader, writer, return_exceptions=True)
                error = next((r for r in results if isinstance(r, BaseException)
                              and not isinstance(r, asyncio.CancelledError)), None)
        except InvalidStatus as exc:
            status = exc.response.status_code
            error = ProtocolError(f"the server refused the connection (HTTP {status})")
        except asyncio.CancelledError:
            error = StreamFailed("the connection was dropped")
        except Exception as exc:  # unreachable, refused, TLS, timeout
            error = StreamFailed(f"connection to {self._url} failed: {exc!r}")
            error.__cause__ = exc
        finally:
            self._ended = True
            self._on_closed(error)

    async def _write(self, ws: ClientConnection) -> None:
        assert self._wake is not None
        while True:
            while self._out:
                item = self._out.popleft()
                frames = await item() if callable(item) else [item]
                for frame in frames:
                    await ws.send(frame)
            if self._closing:
                return
            self._wake.clear()
            await self._wake.wait()

    async def _read(self, ws: ClientConnection) -> None:
        """Messages to the conversation; returns None at a normal close, else the error."""
        try:
            while True:
                frame = await ws.recv()
                if isinstance(frame, bytes):
                    raise ProtocolError("the server sent a binary frame no message announced")
                msg = wire.loads(frame)
                size_field = _ANNOUNCES_BINARY.get(msg["type"])
                data = None
                if size_field is not None and msg.get(size_field):
                    data = await ws.recv()
                    if not isinstance(data, bytes) or len(data) != msg[size_field]:
                        raise ProtocolError("the server's binary frame does not match its message")
                self._on_message(msg, data)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            if code == wire.CLOSE_UNAUTHORIZED:
                raise ProtocolError("the server refused the token (close 4401)") from None
            if code == wire.CLOSE_SUPERSEDED:  # two clients share a session id: never fight
                raise ProtocolError("another connection with this session id took over the "
                                    "conversation (close 4409)") from None
            if code in (wire.CLOSE_NORMAL, wire.CLOSE_GOING_AWAY) and self._closing:
                return
            raise StreamFailed(f"the connection closed (code {code}"
                               f"{', ' + exc.rcvd.reason if exc.rcvd and exc.rcvd.reason else ''})"
                               ) from None
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"the server sent malformed JSON: {exc}") from None
