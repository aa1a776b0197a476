"""One WebSocket = one conversation (docs/PROTOCOL.md, "Conversations").

The socket's messages are read in order by one loop, and each is applied to the engine's
`Conversation` at once (so requests keep the order they were sent in); every turn gets a task
that forwards its chunks and ends with `turn_end`. A malformed, oversized, unknown or
out-of-order message ends only this socket, with an `error` of type `ProtocolError`; when the
socket ends for any reason, its turn tasks are cancelled and its conversation is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from core import wire
from core.engine.conversation import UNCHANGED, Conversation
from core.engine.engine import Engine
from core.engine.stream import AudioChunk, TurnStatus, TurnStream, _check_played_s
from core.errors import AdmissionError, EngineClosed, MossError, ProtocolError, StreamFailed
from core.server.control import ServerControl
from core.server.limits import ServerLimits
from core.server.parked import Parked, SessionTable
from core.server.quota import ClientQuota
from core.server.voices import MAX_VOICE_FRAMES, VoiceRegistry
from core.values import PastTurn, UserTurn, Voice

log = logging.getLogger("core.server")
MAX_KEY_CHARS = 256
MAX_SESSION_CHARS = 128
MAX_HISTORY_TURNS = 1024  # turns a `hello` may bring (a rebuilt conversation's history)
MAX_SOCKET_VOICES = 32  # voices one socket may name at once (oldest forgotten first)


class _Close(Exception):
    """End the socket with `code` (after an optional error message has been sent)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class _Fault(ProtocolError):
    """A protocol violation: `error` (ProtocolError), then close with `code`."""

    def __init__(self, message: str, code: int = wire.CLOSE_POLICY) -> None:
        super().__init__(message)
        self.code = code


class Session:
    """The server side of one conversation socket."""

    def __init__(self, ws: WebSocket, engine: Engine, limits: ServerLimits,
                 voices: VoiceRegistry, control: ServerControl, table: SessionTable,
                 quota: ClientQuota) -> None:
        self.ws, self.engine, self.limits, self.voices = ws, engine, limits, voices
        self.control, self.table, self.quota = control, table, quota
        self.session_id: str | None = None
        self.serve_task: asyncio.Task[None] | None = None
        self.superseded = False
        self.handed: Parked | None = None  # what a takeover gets
        self.keep = False  # the socket dropped: park the conversation for a reconnect
        self.sent_s: dict[int, float] = {}  # audio sent per turn: what the listener may have
        self.turns_changed = asyncio.Event()
        self.cleaned_up = asyncio.Event()
        self.conv: Conversation | None = None
        self.local_voices: dict[str, Voice] = {}  # keys this socket sent -> their voices
        self.streams: OrderedDict[int, TurnStream] = OrderedDict()
        self.last_turn = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.busy: set[asyncio.Task[None]] = set()  # turns and user turns not answered yet
        self.send_lock = asyncio.Lock()
        self.sent_history: tuple[PastTurn, ...] | None = None
        self.refs: dict[int, tuple[PastTurn, int]] = {}  # id(turn) -> (turn, its ref)
        self.next_ref = 1

    async def run(self) -> None:
        """Serve the socket until it closes; never raises."""
        code, reason = wire.CLOSE_NORMAL, ""
        self.serve_task = asyncio.create_task(self._serve())
        try:
            try:
                await asyncio.shield(self.serve_task)
            except asyncio.CancelledError:
                if not self.superseded:
                    self.serve_task.cancel()
                    raise
                code, reason, self.keep = wire.CLOSE_SUPERSEDED, "superseded", True
        except ProtocolError as exc:  # wire.* and the registry raise it too (code 1008)
            await self._send_quietly({"type": "error", "error": wire.error_object(exc)})
            code, reason = getattr(exc, "code", wire.CLOSE_POLICY), "protocol error"
        except _Close as exc:
            code, reason = exc.code, exc.reason
        except WebSocketDisconnect:
            code, self.keep = -1, True
        except Exception:  # a bug: this socket ends, the server and the others go on
            log.exception("conversation socket failed")
            code, reason = 1011, "internal error"
        finally:
            await self._cleanup()
        if code >= 0 and self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code, reason)

    # -- reading ----------------------------------------------------------------------------
    async def _serve(self) -> None:
        while True:
            frame = await self._receive()
            if isinstance(frame, bytes):
                raise _Fault("a binary frame that no message announced")
            msg = wire.loads(frame)
            handler = _HANDLERS.get(msg["type"])
            if handler is None:
                raise _Fault(f"unknown message type {msg['type']!r:.80}")
            if self.conv is None and msg["type"] not in ("hello", "voice"):
                raise _Fault(f"'{msg['type']}' before 'hello'")
            await handler(self, msg)

    async def _receive(self) -> str | bytes:
        """The next frame, size-checked; an idle socket (no turn running) is closed."""
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), self.limits.idle_timeout_s)
            except TimeoutError:
                if self.busy:  # a turn is running: its listener is not idle
                    continue
                raise _Close(wire.CLOSE_GOING_AWAY, "idle") from None
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            data = message.get("bytes")
            if data is None:
                data = message.get("text") or ""
                size = len(data) if len(data) * 4 <= self.limits.max_message_bytes else len(
                    data.encode("utf-8", "surrogatepass"))
            else:
                size = len(data)
            if size > self.limits.max_message_bytes:
                raise _Fault(f"a frame of {size} bytes, over max_message_bytes="
                             f"{self.limits.max_message_bytes}", wire.CLOSE_TOO_BIG)
            return data

    async def _binary(self, nbytes: int) -> bytes:
        """The binary frame a message announced, exactly `nbytes` long."""
        frame = await self._receive()
        if not isinstance(frame, bytes) or len(frame) != nbytes:
            raise _Fault(f"expected a binary frame of {nbytes} bytes")
        return frame

    async def hand_over(self) -> Parked | None:
        """A newer socket of this session takes over: end this one, keep its conversation."""
        self.superseded = True
        task = self.serve_task
        if task is not None and not task.done():
            task.cancel()
        await self.cleaned_up.wait()  # run() parks the conversation into `handed`
        return self.handed

    # -- handlers ---------------------------------------------------------------------------
    async def _hello(self, msg: dict[str, Any]) -> None:
        if self.conv is not None:
            raise _Fault("'hello' twice")
        versions = wire.get_list(msg, "versions", max_len=64)
        if wire.VERSION not in [v for v in versions if type(v) is int]:
            raise _Fault("no common version")
        raw = msg.get("sampling")
        sampling = None if raw is None else wire.sampling_from_wire(raw)
        voice = self._voice(msg.get("voice"))
        session_id = wire.get_str(msg, "session", max_len=MAX_SESSION_CHARS, optional=True)
        turn_base = wire.get_int(msg, "turn_base", optional=True) or 0
        history = await self._history(msg.get("history"))
        parked = None
        try:
            self.quota.acquire()
        except AdmissionError as exc:
            await self._send({"type": "error", "error": wire.error_object(exc)})
            raise _Close(wire.CLOSE_TRY_LATER, type(exc).__name__) from None
        if session_id:
            self.session_id = session_id
            parked = await self.table.claim(session_id, self)
        try:
            if parked is not None:
                self.conv = parked.conv
                if turn_base >= parked.last_turn:  # the same client: its old turns stay its own
                    self.streams = parked.streams
                self.last_turn = turn_base
            elif self.control.draining:
                raise AdmissionError("this server is draining: it takes no new conversations")
            else:
                try:
                    self.conv = self.engine.conversation(voice=voice, sampling=sampling,
                                                         history=history)
                except (TypeError, ValueError) as exc:
                    raise _Fault(f"unusable history: {exc}") from None
                self.last_turn = turn_base
        except (AdmissionError, EngineClosed) as exc:
            await self._send({"type": "error", "error": wire.error_object(exc)})
            code = wire.CLOSE_TRY_LATER if isinstance(exc, AdmissionError) else \
                wire.CLOSE_GOING_AWAY
            raise _Close(code, type(exc).__name__) from None
        cfg = self.engine.config
        await self._send({
            "type": "welcome", "version": wire.VERSION, "sample_rate": wire.SAMPLE_RATE,
            "server": self.control.server_id,
            "limits": {"max_text_chars": cfg.max_text_chars,
                       "max_user_audio_s": cfg.max_user_audio_s,
                       "cuttable_turns": cfg.cuttable_turns,
                       "max_message_bytes": self.limits.max_message_bytes},
            "sampling": wire.sampling_to_wire(self.conv.sampling),
            "resumed": parked is not None})
        if not self.conv.history:
            self.sent_history = self.conv.history  # empty: nothing to announce yet
        loop = asyncio.get_running_loop()

        def changed() -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):  # this loop is gone
                loop.call_soon_threadsafe(self.turns_changed.set)

        self.conv.on_turns_changed(changed)
        self.turns_changed.set()
        self._spawn(self._watch_turns(), busy=False)

    async def _history(self, items: object) -> list[PastTurn]:
        """A `hello`'s history (a conversation rebuilt from what its client held), with the
        codes frame each turn announced."""
        if items is None:
            return []
        if not isinstance(items, list) or len(items) > MAX_HISTORY_TURNS:
            raise _Fault(f"'history' must be a list of at most {MAX_HISTORY_TURNS} turns")
        turns = []
        for item in items:
            if not isinstance(item, dict):
                raise _Fault("a history turn must be an object")
            role = wire.get_str(item, "role", max_len=16)
            text = wire.get_str(item, "text", max_len=self.limits.max_message_bytes)
            ids = wire.get_list(item, "text_ids", max_len=self.limits.max_message_bytes // 4)
            if not all(type(i) is int for i in ids):
                raise _Fault("'text_ids' must be ints")
            frames = wire.get_int(item, "frames", high=self.limits.max_message_bytes // 32)
            codes = None
            if frames:
                codes = wire.codes_from_wire(await self._binary(frames * wire.CODEBOOKS * 2))
            turns.append(PastTurn(role or "", text or "", codes, tuple(ids)))
        return turns

    async def _voice_msg(self, msg: dict[str, Any]) -> None:
        key = wire.get_str(msg, "key", max_len=MAX_KEY_CHARS)
        frames = wire.get_int(msg, "frames", low=1, high=MAX_VOICE_FRAMES)
        assert key is not None and frames is not None
        data = await self._binary(frames * 16 * 2)
        self.local_voices.pop(key, None)
        self.local_voices[key] = self.voices.from_wire(key, frames, data)
        while len(self.local_voices) > MAX_SOCKET_VOICES:
            self.local_voices.pop(next(iter(self.local_voices)))

    async def _speak(self, msg: dict[str, Any]) -> None:
        assert self.conv is not None
        turn = wire.get_int(msg, "turn", low=self.last_turn + 1)
        assert turn is not None
        voice = self._voice(msg["voice"]) if "voice" in msg else UNCHANGED
        raw = msg.get("sampling")
        sampling = None if raw is None else wire.sampling_from_wire(raw)
        users = [await self._user(u) for u in wire.get_list(
            msg, "users", max_len=self.limits.max_users_per_speak)]
        self.last_turn = turn
        try:
            stream = self.conv.speak(user=users, voice=voice, sampling=sampling)
        except Exception as exc:  # refused at once: the turn ends before it began
            await self._send(_turn_end(turn, "failed", exc, None))
            return
        self.streams[turn] = stream
        while len(self.streams) > self.limits.kept_turns:
            self.streams.popitem(last=False)
        self._spawn(self._forward(turn, stream))

    async def _user(self, item: object) -> UserTurn:
        """One `{text, sample_rate, audio_bytes}` entry and its PCM frame."""
        if not isinstance(item, dict):
            raise _Fault("a user turn must be an object")
        text = wire.get_str(item, "text", max_len=self.limits.max_message_bytes)
        nbytes = wire.get_int(item, "audio_bytes", high=self.limits.max_message_bytes)
        rate = wire.get_int(item, "sample_rate", low=1, high=10**6, optional=True)
        if nbytes and rate is None:
            raise _Fault("user audio needs a 'sample_rate'")
        audio = await self._binary(nbytes) if nbytes else None
        return UserTurn(text or "", audio, rate)

    async def _text(self, msg: dict[str, Any]) -> None:
        turn, stream = self._stream(msg)
        delta = wire.get_str(msg, "delta", max_len=self.limits.max_message_bytes)
        if stream is not None:
            try:
                stream.push_text(delta or "")
            except (MossError, ValueError) as exc:  # this delta is refused; the turn goes on
                await self._send({"type": "error", "turn": turn, "error": wire.error_object(exc)})

    async def _end_text(self, msg: dict[str, Any]) -> None:
        _, stream = self._stream(msg)
        if stream is not None:
            stream.end_text()

    async def _stop(self, msg: dict[str, Any]) -> None:
        _, stream = self._stream(msg)
        played = _played(msg.get("played_s"))
        if stream is not None:
            stream.cancel(played)

    async def _played(self, msg: dict[str, Any]) -> None:
        _, stream = self._stream(msg)
        played = _played(msg.get("played_s"))
        if played is None:
            raise _Fault("'played_s' must be a number")
        if stream is not None:
            stream.mark_played(played)

    async def _add_user(self, msg: dict[str, Any]) -> None:
        assert self.conv is not None
        request = wire.get_int(msg, "request")
        user = await self._user(msg)
        # Started at once: the user turn takes its place among this socket's requests now,
        # before any message read after it (a task would only start at the next loop turn).
        try:
            pending = _Started(self.conv.add_user_turn(user.text, user.audio, user.sample_rate))
        except Exception as exc:
            await self._send({"type": "user_added", "request": request,
                              "error": wire.error_object(exc)}, turns_first=True)
            return
        self._spawn(self._answer_user(request, pending))

    async def _close(self, msg: dict[str, Any]) -> None:
        if self.conv is not None:
            self.conv.close()
        raise _Close(wire.CLOSE_NORMAL, "closed")

    # -- turns ------------------------------------------------------------------------------
    async def _forward(self, turn: int, stream: TurnStream) -> None:
        """Chunks of one turn to the socket, then `turn_end` (after the history it left)."""
        with contextlib.suppress(Exception):  # the turn's own error is `stream.error`
            async for chunk in stream:
                await self._send(_chunk(turn, chunk), chunk.pcm or None)
                self.sent_s[turn] = chunk.start_s + chunk.duration_s
        status, error = stream.status, stream.error
        if status is TurnStatus.FINISHED:
            error = None
        elif status not in (TurnStatus.CANCELLED, TurnStatus.FAILED) or error is None:
            status, error = TurnStatus.FAILED, StreamFailed(f"turn {turn} ended early")
        await self._send(_turn_end(turn, status.value, error, stream), turns_first=True)

    async def _answer_user(self, request: int, pending: _Started) -> None:
        error: dict[str, str] | None = None
        try:
            await _await(pending)
        except Exception as exc:
            error = wire.error_object(exc)
        await self._send({"type": "user_added", "request": request, "error": error},
                         turns_first=True)

    async def _watch_turns(self) -> None:
        """History changes that have no message of their own (a stop, a late mark_played)."""
        while True:
            await self.turns_changed.wait()
            self.turns_changed.clear()
            await self._send(None, turns_first=True)

    # -- helpers ----------------------------------------------------------------------------
    def _voice(self, key: object) -> Voice | None:
        if key is None:
            return None
        if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
            raise _Fault("'voice' must be a voice key or null")
        voice = self.local_voices.get(key) or self.voices.get(key)
        if voice is None:
            raise _Fault(f"unknown voice {key!r}: send a 'voice' message first")
        return voice

    def _stream(self, msg: dict[str, Any]) -> tuple[int, TurnStream | None]:
        """The turn a message names; None for one too old to be kept (then it is ignored)."""
        turn = wire.get_int(msg, "turn", low=1, high=self.last_turn)
        assert turn is not None
        return turn, self.streams.get(turn)

    async def _send(self, msg: dict[str, Any] | None, binary: bytes | None = None, *,
                    turns_first: bool = False) -> None:
        """Frames of one message, never interleaved with another's; with `turns_first`, a
        changed history goes out before it (so `turn_end` arrives after its `turns`)."""
        async with self.send_lock:
            if turns_first and self.conv is not None and self.conv.history is not self.sent_history:
                await self._send_history(self.conv.history)
            if msg is not None:
                await self.ws.send_text(wire.dumps(msg))
            if binary:
                await self.ws.send_bytes(binary)

    async def _send_history(self, history: tuple[PastTurn, ...]) -> None:
        """`past` for each turn this socket has not sent yet (its codes), then `turns`."""
        refs: dict[int, tuple[PastTurn, int]] = {}
        for turn in history:
            known = self.refs.get(id(turn))
            if known is None:
                known = (turn, self.next_ref)
                self.next_ref += 1
                codes = wire.codes_to_wire(turn.codes)
                await self.ws.send_text(wire.dumps({"type": "past", "ref": known[1],
                                                    **wire.past_to_wire(turn, len(codes))}))
                if codes:
                    await self.ws.send_bytes(codes)
            refs[id(turn)] = known
        self.refs, self.sent_history = refs, history
        await self.ws.send_text(wire.dumps({"type": "turns", "turns": [
            {"role": t.role, "text": t.text, "frames": t.frames, "ref": refs[id(t)][1]}
            for t in history]}))

    async def _send_quietly(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self._send(msg)

    def _spawn(self, coro: Coroutine[Any, Any, None], *, busy: bool = True) -> None:
        task = asyncio.create_task(self._guard(coro))
        for tasks in (self.tasks, self.busy) if busy else (self.tasks,):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    @staticmethod
    async def _guard(coro: Awaitable[None]) -> None:
        """A task of this socket never logs an error for a peer that went away."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("socket task ended: %r", exc)

    async def _cleanup(self) -> None:
        """Turn tasks end; a dropped socket's conversation is parked for its session's next
        socket (its running turns stopped where the listener may have heard them), any other
        is closed."""
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        conv, parked = self.conv, None
        if conv is not None:
            conv.on_turns_changed(None)
            if self.keep and self.session_id and not conv.closed and not self.engine.closed:
                for turn, stream in self.streams.items():
                    if not stream.done:
                        stream.cancel(self.sent_s.get(turn, 0.0))
                parked = Parked(conv, self.streams, self.last_turn)
        if self.session_id:
            if self.superseded:
                self.handed = parked
            else:
                self.table.release(self.session_id, self, parked)
        if conv is not None and parked is None:
            conv.close()
        self.quota.release()
        self.cleaned_up.set()


def _played(value: object) -> float | None:
    try:
        return _check_played_s(value)
    except ValueError as exc:
        raise _Fault(str(exc)) from None


def _chunk(turn: int, chunk: AudioChunk) -> dict[str, Any]:
    return {"type": "chunk", "turn": turn, "start_s": chunk.start_s,
            "duration_s": chunk.duration_s, "final": chunk.final,
            "words": wire.words_to_wire(chunk.words), "bytes": len(chunk.pcm)}


def _turn_end(turn: int, status: str, error: BaseException | None,
              stream: TurnStream | None) -> dict[str, Any]:
    return {"type": "turn_end", "turn": turn, "status": status,
            "error": None if error is None else wire.error_object(error),
            "frames": stream.frames if stream else 0,
            "ttfa_s": stream.ttfa_s if stream else None,
            "prefilled_rows": stream.prefilled_rows if stream else 0}


class _Started:
    """A coroutine already run up to its first suspension (Python 3.11 has no eager tasks):
    its synchronous part (here: posting the command) happens now, the rest when awaited."""

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self._done, self._result, self._first = False, None, None
        try:
            self._first = coro.send(None)
        except StopIteration as stop:
            self._done, self._result = True, stop.value

    def __await__(self) -> Generator[Any, Any, Any]:
        if self._done:
            return self._result
        yielded = self._first
        while True:
            try:
                value = yield yielded
            except BaseException as exc:  # cancellation and the like go into the coroutine
                try:
                    yielded = self._coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                yielded = self._coro.send(value)
            except StopIteration as stop:
                return stop.value


async def _await(started: _Started) -> Any:
    return await started


_HANDLERS = {
    "hello": Session._hello, "voice": Session._voice_msg, "speak": Session._speak,
    "text": Session._text, "end_text": Session._end_text, "stop": Session._stop,
    "played": Session._played, "add_user": Session._add_user, "close": Session._close,
}
