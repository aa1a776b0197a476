"""TurnStream: the caller's handle on one assistant turn, usable from any asyncio loop.

The caller pushes text deltas (never blocking: they go into a lock-protected inbox the engine
thread drains) and iterates `AudioChunk`s (delivered through a `ChunkChannel`). All model work
happens on the engine thread; this object only moves text in and audio out.
"""

from __future__ import annotations

import asyncio
import enum
import math
import numbers
import reprlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from core.engine.commands import MarkPlayed, StopTurn
from core.engine.delivery import ChunkChannel
from core.errors import StreamCancelled, TextTooLongError

if TYPE_CHECKING:
    from types import TracebackType

    from core.timings import WordTiming


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """A piece of one turn's audio: mono int16 PCM plus the words estimated to end inside it.

    `start_s` is measured from the start of the turn; `words` are the words released with this
    chunk (timings cumulative over the turn, never ahead of the audio emitted so far, never
    revised). `final` marks the last chunk of a turn that ended normally; it may be empty (no
    samples) when the turn's audio ended exactly on a chunk boundary.
    """

    pcm: bytes
    sample_rate: int
    start_s: float
    duration_s: float
    words: list[WordTiming] = field(default_factory=list)
    final: bool = False

    @property
    def num_samples(self) -> int:
        return len(self.pcm) // 2


class TurnStatus(enum.Enum):
    QUEUED = "queued"  # waiting behind the conversation's active turn
    ACTIVE = "active"  # prefilling or generating
    FINISHED = "finished"  # ended by EOS or the frame cap
    CANCELLED = "cancelled"
    FAILED = "failed"  # error set (StreamFailed, EngineClosed, ContextOverflowError)


class _Inbox(Protocol):
    """What a stream needs from the engine's inbox: a wake-up and a way to post its commands."""

    def wake(self) -> None: ...

    def stop_turn(self, turn_id: int, command: StopTurn) -> None: ...

    def post(self, command: MarkPlayed, *, strict: bool = True) -> None: ...


class TurnStream:
    """One assistant turn: `push_text`/`end_text` in, `AudioChunk`s out; `stop()` ends it early
    and `mark_played(played_s)` tells the engine what the listener heard (`cancel` does both).

    Iteration ends normally after the final chunk; after `stop()` it raises `StreamCancelled`
    at once (no chunk is returned after a stop); when the engine closes it raises
    `EngineClosed`; when serving this stream failed it raises that error (`StreamFailed` with
    the original as `__cause__`, `ContextOverflowError`, or the retryable `CapacityError` when the
    KV pool could not hold the turn within `kv_wait_s`).
    """

    def __init__(self, inbox: _Inbox, turn_id: int, max_text_chars: int) -> None:
        self._inbox = inbox
        self.turn_id = turn_id
        self._max_chars = max_text_chars
        self._lock = threading.Lock()
        self._deltas: list[str] = []
        self._chars = 0
        self._text_parts: list[str] = []
        self._text_ended = False
        self._status = TurnStatus.QUEUED
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._done_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._channel: ChunkChannel[AudioChunk] = ChunkChannel()
        self.frames = 0  # frames generated so far (engine thread writes)
        self.ttfa_s: float | None = None  # seconds from lead ready to first chunk
        self.prefilled_rows = 0  # prompt + lead rows this turn prefilled (history reuse check)

    # -- text in -----------------------------------------------------------------------------
    def push_text(self, delta: str) -> None:
        """Queue a text delta of any size; never blocks.

        Raises:
            TypeError: `delta` is not a str.
            ValueError: text was already ended.
            TextTooLongError: the turn's text would exceed `EngineConfig.max_text_chars`
                (this delta is rejected; the turn keeps what it had).
        """
        if not isinstance(delta, str):
            raise TypeError(f"push_text takes str, got {type(delta).__name__}")
        with self._lock:
            if self._text_ended:
                raise ValueError("push_text after end_text()")
            if self._done.is_set() or self._status is TurnStatus.CANCELLED or not delta:
                return  # the turn is over (or was interrupted): late text has nowhere to go
            if self._chars + len(delta) > self._max_chars:
                raise TextTooLongError(
                    f"turn text would be {self._chars + len(delta)} characters, "
                    f"more than max_text_chars={self._max_chars}"
                )
            self._chars += len(delta)
            self._deltas.append(delta)
            self._text_parts.append(delta)
        self._inbox.wake()

    def end_text(self) -> None:
        """No more text: the turn pads until the model ends it (idempotent)."""
        with self._lock:
            self._text_ended = True
        self._inbox.wake()

    @property
    def text(self) -> str:
        """All text pushed so far."""
        with self._lock:
            return "".join(self._text_parts)

    @property
    def text_ended(self) -> bool:
        return self._text_ended

    def take_text(self) -> tuple[str, bool]:
        """Engine thread: the deltas pushed since the last call, and whether text has ended."""
        with self._lock:
            text = "".join(self._deltas)
            self._deltas.clear()
            return text, self._text_ended

    # -- control -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop generating now (a queued turn never starts). The history keeps what was
        delivered until `mark_played` says how much of it was heard. No chunk is returned by
        iteration after this call."""
        self._stop(None)

    def mark_played(self, played_s: float) -> None:
        """The listener heard the first `played_s` seconds of this turn: the conversation keeps
        that much (its frames and the words estimated as heard), now or when the turn ends.

        Valid while the turn runs and after it, for the conversation's last
        `EngineConfig.cuttable_turns` finished turns (a reply spoken as several turns is cut
        where playback stopped, its unplayed turns with 0). It does not stop generation.

        Raises:
            ValueError: `played_s` is not a finite real number >= 0 (seconds); a bool, a string
                or an int too large for a float included. Nothing is recorded then.
        """
        played = _check_played_s(played_s)
        if played is None:
            raise ValueError("played_s must be a finite number of seconds >= 0, got None")
        self._inbox.post(MarkPlayed(self, played), strict=False)

    def cancel(self, played_s: float | None = None) -> None:
        """`stop()`, then `mark_played(played_s)` when given, as one command.

        Raises:
            ValueError: `played_s` is not None or a finite real number >= 0 (seconds); a bool,
                a string or an int too large for a float included. Nothing is cancelled then.
        """
        self._stop(_check_played_s(played_s))

    def _stop(self, played_s: float | None) -> None:
        with self._lock:
            if self._status in (TurnStatus.QUEUED, TurnStatus.ACTIVE):
                self._status = TurnStatus.CANCELLED
                self._error = StreamCancelled(f"turn {self.turn_id} was cancelled")
        self._channel.abort(StreamCancelled(f"turn {self.turn_id} was cancelled"))
        self._inbox.stop_turn(self.turn_id, StopTurn(self, played_s))

    @property
    def status(self) -> TurnStatus:
        return self._status

    @property
    def done(self) -> bool:
        """True once no more audio will be generated (finished, cancelled, failed or closed)."""
        return self._done.is_set() or self._status is TurnStatus.CANCELLED

    @property
    def error(self) -> BaseException | None:
        """Why the turn ended early (None while running and after a normal end)."""
        return self._error

    async def wait(self) -> None:
        """Wait until generation has ended (without consuming chunks)."""
        if self._done.is_set():
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if not self._done.is_set():
                self._done_waiters.append((loop, fut))
            else:
                fut.set_result(None)
        await fut

    # -- engine side -------------------------------------------------------------------------
    def _put(self, chunk: AudioChunk) -> None:
        """Engine thread: hand a chunk to the consumer (dropped after a cancel)."""
        self._channel.put(chunk)

    def _set_active(self) -> None:
        with self._lock:
            if self._status is TurnStatus.QUEUED:
                self._status = TurnStatus.ACTIVE

    def _finish(self, error: BaseException | None = None) -> None:
        """Engine thread: generation ended; `error` None for a normal end."""
        with self._lock:
            if self._status in (TurnStatus.QUEUED, TurnStatus.ACTIVE):
                if error is None:
                    self._status = TurnStatus.FINISHED
                else:
                    self._status = TurnStatus.FAILED
                    self._error = error
            waiters, self._done_waiters = self._done_waiters, []
            self._done.set()
        self._channel.close(error if self._status is TurnStatus.FAILED else None)
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that loop is closed
                pass

    async def aclose(self) -> None:
        """Stop consuming: a turn still generating is cancelled (what was emitted is kept)."""
        if not self.done:
            self.cancel()

    # -- audio out ---------------------------------------------------------------------------
    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> AudioChunk:
        return await self._channel.get()

    async def __aenter__(self) -> TurnStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Leaving without `end_text()` (or with an error) cancels the turn."""
        if self.done:
            return
        if exc_type is not None or not self._text_ended:
            self.cancel()


def _check_played_s(played_s: object) -> float | None:
    """None, or `played_s` as a float; one documented error (ValueError) for anything else,
    where `math.isfinite` alone raised OverflowError for a huge int and TypeError for a str."""
    if played_s is None:
        return None
    value = math.nan
    if isinstance(played_s, numbers.Real) and not isinstance(played_s, bool):
        try:
            value = float(played_s)
        except (OverflowError, ValueError):
            pass
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"played_s must be a finite number of seconds >= 0 or None, "
                         f"got {reprlib.repr(played_s)}")
    return value


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

