"""RemoteTurnStream: `TurnStream`'s interface for a turn served over the wire.

Text and control calls never block: they queue one message on the conversation's socket.
Chunks arrive through the same `ChunkChannel` the in-process stream uses, so iteration,
`stop()` (no chunk after it) and errors behave alike; what needs the engine (the turn's status
at its end, frames, time to first audio) comes with `turn_end`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

from core import wire
from core.engine.delivery import ChunkChannel
from core.engine.stream import AudioChunk, TurnStatus, _check_played_s
from core.errors import StreamCancelled, TextTooLongError
from core.timings import FRAME_S

if TYPE_CHECKING:
    from types import TracebackType

    from core.remote.conversation import RemoteConversation


class RemoteTurnStream:
    """One assistant turn of a `RemoteConversation` (see `core.engine.stream.TurnStream`)."""

    def __init__(self, conv: RemoteConversation, turn_id: int) -> None:
        self._conv = conv
        self.turn_id = turn_id  # renumbered when the request is sent again on a new socket
        self._order = -1  # the request's place among its conversation's requests
        self._users: tuple[Any, ...] = ()  # the user turns its request carries
        self._refused_here = False  # its request never left (unreadable user audio)
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._chars = 0
        self._text_ended = False
        self._status = TurnStatus.QUEUED
        self._error: BaseException | None = None
        self._late_error: BaseException | None = None  # the server refused a delta
        self._ended = False
        self._done_event = asyncio.Event()
        self._channel: ChunkChannel[AudioChunk] = ChunkChannel()
        self.frames = 0
        self.ttfa_s: float | None = None
        self.prefilled_rows = 0

    # -- text in -----------------------------------------------------------------------------
    def push_text(self, delta: str) -> None:
        """Queue a text delta; never blocks. Raises like `TurnStream.push_text`."""
        if not isinstance(delta, str):
            raise TypeError(f"push_text takes str, got {type(delta).__name__}")
        with self._lock:
            if self._text_ended:
                raise ValueError("push_text after end_text()")
            if self._late_error is not None:
                error, self._late_error = self._late_error, None
                raise error
            if self.done or not delta:
                return
            limit = self._conv._engine.config.max_text_chars  # the server's, once welcomed
            if self._chars + len(delta) > limit:
                raise TextTooLongError(
                    f"turn text would be {self._chars + len(delta)} characters, "
                    f"more than max_text_chars={limit}")
            self._chars += len(delta)
            self._parts.append(delta)
        self._control({"type": "text", "turn": self.turn_id, "delta": delta})

    def end_text(self) -> None:
        """No more text (idempotent)."""
        with self._lock:
            if self._text_ended:
                return
            self._text_ended = True
        self._control({"type": "end_text", "turn": self.turn_id})

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self._parts)

    @property
    def text_ended(self) -> bool:
        return self._text_ended

    # -- control -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop generating now; no chunk is returned by iteration after this call."""
        self._stop(None)

    def mark_played(self, played_s: float) -> None:
        """The listener heard the first `played_s` seconds (see `TurnStream.mark_played`)."""
        played = _check_played_s(played_s)
        if played is None:
            raise ValueError("played_s must be a finite number of seconds >= 0, got None")
        self._control({"type": "played", "turn": self.turn_id, "played_s": played})

    def cancel(self, played_s: float | None = None) -> None:
        """`stop()`, then `mark_played(played_s)` when given, as one message."""
        self._stop(_check_played_s(played_s))

    def _stop(self, played_s: float | None) -> None:
        with self._lock:
            if self._status in (TurnStatus.QUEUED, TurnStatus.ACTIVE):
                self._status = TurnStatus.CANCELLED
                self._error = StreamCancelled(f"turn {self.turn_id} was cancelled")
        self._channel.abort(StreamCancelled(f"turn {self.turn_id} was cancelled"))
        self._control({"type": "stop", "turn": self.turn_id, "played_s": played_s})

    @property
    def status(self) -> TurnStatus:
        return self._status

    @property
    def done(self) -> bool:
        return self._ended or self._status is TurnStatus.CANCELLED

    @property
    def error(self) -> BaseException | None:
        return self._error

    async def wait(self) -> None:
        """Wait until the server reported the turn's end (or the connection ended)."""
        await self._done_event.wait()

    def _control(self, msg: dict[str, Any]) -> None:
        """A message about this turn, in call order; dropped when the turn's own request was
        refused here (the server never heard of the turn: naming it would be out of order)."""

        async def frames() -> list[str | bytes]:
            return [] if self._refused_here else [wire.dumps(msg)]

        self._conv._send(frames)

    # -- from the socket ---------------------------------------------------------------------
    def _put(self, chunk: AudioChunk) -> None:
        with self._lock:
            if self._status is TurnStatus.QUEUED:
                self._status = TurnStatus.ACTIVE
        self.frames = max(self.frames, round((chunk.start_s + chunk.duration_s) / FRAME_S))
        self._channel.put(chunk)

    def _refused(self, error: BaseException) -> None:
        """The server refused a delta: raised by the next `push_text`."""
        with self._lock:
            self._late_error = error

    def _end(self, status: TurnStatus, error: BaseException | None,
             info: dict[str, Any] | None = None) -> None:
        """The turn ended (`turn_end`, or the connection's end)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            if self._status in (TurnStatus.QUEUED, TurnStatus.ACTIVE):
                self._status = status
                if status is not TurnStatus.FINISHED:
                    self._error = error
        if info:
            self.frames = info.get("frames") or self.frames
            self.ttfa_s = info.get("ttfa_s")
            self.prefilled_rows = info.get("prefilled_rows") or 0
        self._channel.close(self._error if self._status is TurnStatus.FAILED else None)
        self._done_event.set()

    async def aclose(self) -> None:
        """Stop consuming: a turn still generating is cancelled."""
        if not self.done:
            self.cancel()

    # -- audio out ---------------------------------------------------------------------------
    def __aiter__(self) -> RemoteTurnStream:
        return self

    async def __anext__(self) -> AudioChunk:
        return await self._channel.get()

    async def __aenter__(self) -> RemoteTurnStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Leaving without `end_text()` (or with an error) cancels the turn."""
        if self.done:
            return
        if exc_type is not None or not self._text_ended:
            self.cancel()
