"""RemoteConversation: `Conversation`'s interface over one WebSocket (docs/PROTOCOL.md).

Every call maps to one message, sent in call order, so the server's conversation sees the
requests in the order they were made, as an in-process one would. Checks that need no engine
(user turn types, text length, audio header) run here, before anything is sent; refusals only
the engine can make (AdmissionError, ...) end the turn's stream with the same class.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from core import wire
from core.engine.conversation import UNCHANGED, NextTurnSettings, check_user_turn
from core.engine.stream import AudioChunk, TurnStatus
from core.errors import EngineClosed, ProtocolError, StreamCancelled, StreamFailed
from core.history import TurnView
from core.remote.audio import user_pcm
from core.remote.connection import Connection
from core.remote.stream import RemoteTurnStream
from core.values import SamplingParams, UserTurn, Voice

if TYPE_CHECKING:
    from core.remote.client import RemoteEngine

log = logging.getLogger("core.remote")
_STATUS = {s.value: s for s in (TurnStatus.FINISHED, TurnStatus.CANCELLED, TurnStatus.FAILED)}


class RemoteConversation(NextTurnSettings):
    """One room or call on a remote engine; use it from one asyncio loop."""

    def __init__(self, engine: RemoteEngine, voice: Voice | None,
                 sampling: SamplingParams, session_id: str) -> None:
        super().__init__(voice, sampling)
        self._engine = engine
        self.session_id = session_id  # routes every connection of this conversation alike
        self.server: str | None = None  # the id of the server that welcomed it last
        self._turns: tuple[TurnView, ...] = ()
        self._streams: dict[int, RemoteTurnStream] = {}
        self._requests: dict[int, asyncio.Future[None]] = {}
        self._next_turn = self._next_request = 1
        self._voices_sent: set[str] = set()
        self._fatal: BaseException | None = None  # why the socket is unusable
        self.closed = False
        self._conn = Connection(engine.ws_url, engine.token, self._on_message, self._on_closed,
                                session_id=session_id)
        self._send_voice(voice)
        self._send({"type": "hello", "versions": [wire.VERSION], "session": session_id,
                    "sampling": wire.sampling_to_wire(sampling),
                    "voice": None if voice is None else voice.key})
        try:
            self._conn.start()
        except RuntimeError:  # no running loop yet: opened by the first speak/add_user_turn
            pass

    @property
    def turns(self) -> tuple[TurnView, ...]:
        """The server's latest snapshot of the history."""
        return self._turns

    def speak(self, *, user: UserTurn | Sequence[UserTurn] = (), voice: Voice | None = UNCHANGED,
              sampling: SamplingParams | None = None) -> RemoteTurnStream:
        """Start an assistant turn (see `Conversation.speak`). Engine-side refusals
        (AdmissionError, ...) end the returned stream with that error instead of raising."""
        users = (user,) if isinstance(user, UserTurn) else tuple(user)
        for u in users:
            check_user_turn(u, self._engine.config)
        msg: dict[str, Any] = {"type": "speak"}
        if voice is not UNCHANGED:
            self.set_voice(voice)
            self._send_voice(self._voice)
            msg["voice"] = None if self._voice is None else self._voice.key
        if sampling is not None:
            self.set_sampling(sampling)
            msg["sampling"] = wire.sampling_to_wire(self._sampling)
        self._check_open()
        turn = self._next_turn
        self._next_turn += 1
        stream = RemoteTurnStream(self, turn)
        self._streams[turn] = stream
        msg["turn"] = turn
        self._send(self._with_audio(msg, "users", users))
        self._start()
        return stream

    async def add_user_turn(self, text: str = "", audio: Any = None,
                            sample_rate: int | None = None) -> None:
        """Add what the user said, after the requests already made (see
        `Conversation.add_user_turn`); returns once the server has it in the history."""
        user = UserTurn(text, audio, sample_rate)
        check_user_turn(user, self._engine.config)
        self._check_open()
        request = self._next_request
        self._next_request += 1
        reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._requests[request] = reply
        self._send(self._with_audio({"type": "add_user", "request": request}, None, (user,)))
        self._start()
        await reply

    def close(self) -> None:
        """Cancel this conversation's turns and free its place on the server (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._fail_all(StreamCancelled("the conversation was closed"))
        self._send({"type": "close"})
        self._conn.close()

    async def aclose(self) -> None:
        self.close()
        await self._conn.wait_closed()

    async def __aenter__(self) -> RemoteConversation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- sending ----------------------------------------------------------------------------
    def _send(self, item: dict[str, Any] | Any) -> None:
        self._conn.send(wire.dumps(item) if isinstance(item, dict) else item)

    def _start(self) -> None:
        try:
            self._conn.start()
        except RuntimeError:
            raise RuntimeError("a RemoteConversation is used from a running asyncio loop") from None

    def _send_voice(self, voice: Voice | None) -> None:
        """A voice's codes, once per socket, before the message that names it."""
        if voice is None or voice.key in self._voices_sent:
            return
        self._voices_sent.add(voice.key)
        codes = voice.codes.numpy().astype("<i2").tobytes()
        self._send({"type": "voice", "key": voice.key, "frames": int(voice.codes.shape[0])})
        self._conn.send(codes)

    def _with_audio(self, msg: dict[str, Any], field: str | None,
                    users: tuple[UserTurn, ...]) -> Callable[[], Awaitable[list[str | bytes]]]:
        """A frame factory: user audio becomes int16 PCM off the loop's thread, then the
        message and its binary frames go out together, in call order."""
        max_s = self._engine.config.max_user_audio_s

        async def frames() -> list[str | bytes]:
            entries, blobs = [], []
            for u in users:
                pcm, rate = b"", u.sample_rate
                if u.audio is not None:
                    pcm, rate = await asyncio.to_thread(user_pcm, u.audio, u.sample_rate, max_s)
                entries.append({"text": u.text, "sample_rate": rate, "audio_bytes": len(pcm)})
                if pcm:
                    blobs.append(pcm)
            if field is None:
                msg.update(entries[0])
            else:
                msg[field] = entries
            return [wire.dumps(msg), *blobs]

        return frames

    # -- receiving --------------------------------------------------------------------------
    def _on_message(self, msg: dict[str, Any], data: bytes | None) -> None:
        try:
            self._dispatch(msg, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed {msg.get('type')!r} message from the server: "
                                f"{exc!r}") from None

    def _dispatch(self, msg: dict[str, Any], data: bytes | None) -> None:
        kind = msg["type"]
        if kind == "chunk":
            stream = self._streams.get(msg.get("turn"))  # type: ignore[arg-type]
            if stream is not None:
                stream._put(AudioChunk(data or b"", wire.SAMPLE_RATE, float(msg["start_s"]),
                                       float(msg["duration_s"]), wire.words_from_wire(msg["words"]),
                                       bool(msg["final"])))
        elif kind == "turn_end":
            stream = self._streams.pop(msg.get("turn"), None)  # type: ignore[arg-type]
            if stream is not None:
                status = _STATUS.get(msg.get("status"), TurnStatus.FAILED)  # type: ignore[arg-type]
                error = None if msg.get("error") is None else wire.error_from(msg["error"])
                stream._end(status, error, msg)
        elif kind == "turns":
            self._turns = wire.turns_from_wire(msg.get("turns"))
        elif kind == "user_added":
            reply = self._requests.pop(msg.get("request"), None)  # type: ignore[arg-type]
            if reply is not None and not reply.done():
                if msg.get("error") is None:
                    reply.set_result(None)
                else:
                    reply.set_exception(wire.error_from(msg["error"]))
        elif kind == "welcome":
            self.server = msg.get("server")
            self._engine._apply_limits(msg.get("limits"))
        elif kind == "error":
            error = wire.error_from(msg.get("error"))
            stream = self._streams.get(msg.get("turn"))  # type: ignore[arg-type]
            if stream is not None:
                stream._refused(error)
            else:
                self._fatal = error
                log.warning("the engine server reported: %r", error)

    def _on_closed(self, error: BaseException | None) -> None:
        """The socket ended: what is still open ends with the reason."""
        if self._fatal is None:
            self._fatal = error or (EngineClosed("the engine was closed") if self._engine.closed
                                    else StreamFailed("the connection to the engine closed"))
        self._fail_all(self._fatal)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream._end(TurnStatus.CANCELLED if isinstance(error, StreamCancelled)
                        else TurnStatus.FAILED, error)
        requests, self._requests = list(self._requests.values()), {}
        for reply in requests:
            if not reply.done():
                reply.set_exception(error)

    # -- checks -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._engine.closed:
            raise EngineClosed("the engine was closed")
        if self.closed:
            raise EngineClosed("this conversation was closed")
        if self._fatal is not None:
            raise self._fatal
