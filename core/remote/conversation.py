"""RemoteConversation: `Conversation`'s interface over one WebSocket (docs/PROTOCOL.md).

Every call maps to one message, sent in call order, so the server's conversation sees the
requests in the order they were made, as an in-process one would. Checks that need no engine
(user turn types, text length, audio header) run here, before anything is sent; refusals only
the engine can make (AdmissionError, ...) end the turn's stream with the same class.

The client keeps the history as the server reports it (`past` + `turns`: every turn as heard,
with its codes). When the socket drops, it reconnects with backoff under the same session id:
the server that still has the conversation resumes it; any other rebuilds it from that history
(`rebuilds` counts it, and the client logs it). Turns that were already speaking end with
`StreamFailed`; requests not answered yet are sent again on the new socket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from core import wire
from core.engine.conversation import UNCHANGED, NextTurnSettings, check_user_turn
from core.engine.stream import AudioChunk, TurnStatus
from core.errors import (
    AdmissionError,
    EngineClosed,
    InvalidAudioError,
    MossError,
    ProtocolError,
    StreamCancelled,
    StreamFailed,
)
from core.history import TurnView
from core.remote.audio import user_pcm
from core.remote.connection import Connection
from core.remote.stream import RemoteTurnStream
from core.values import PastTurn, SamplingParams, UserTurn, Voice

if TYPE_CHECKING:
    from core.remote.client import RemoteEngine

log = logging.getLogger("core.remote")
_STATUS = {s.value: s for s in (TurnStatus.FINISHED, TurnStatus.CANCELLED, TurnStatus.FAILED)}
Frames = Callable[[], Awaitable[list[str | bytes]]]


class RemoteConversation(NextTurnSettings):
    """One room or call on a remote engine; use it from one asyncio loop."""

    def __init__(self, engine: RemoteEngine, voice: Voice | None, sampling: SamplingParams,
                 session_id: str, history: tuple[PastTurn, ...] = ()) -> None:
        super().__init__(voice, sampling)
        self._engine = engine
        self.session_id = session_id  # routes every connection of this conversation alike
        self.server: str | None = None  # the id of the server that welcomed it last
        self.rebuilds = 0  # times another server rebuilt it from the history held here
        self.resumes = 0  # times a reconnect found it where it was
        self._history = history  # sent with every hello until the server reports its own
        self._turns = tuple(TurnView(t.role, t.text, t.frames) for t in history)
        self._past: dict[int, PastTurn] = {}  # this socket's refs -> turns
        self._streams: dict[int, RemoteTurnStream] = {}
        self._requests: dict[int, asyncio.Future[None]] = {}
        # requests not answered yet, in call order: sent again on a new socket
        self._unanswered: dict[int, Callable[[bool], None]] = {}
        self._carried: tuple[UserTurn, ...] = ()  # user turns of replies the server refused
        self._order = itertools.count()
        self._next_turn = self._next_request = 1
        self._voices_sent: set[str] = set()
        self._fatal: BaseException | None = None  # why this conversation is unusable
        self._refusal: BaseException | None = None  # the server refused this socket's hello
        self._conn: Connection | None = None
        self._links = 0  # sockets opened
        self._retry: asyncio.TimerHandle | None = None
        self._lost_at: float | None = None  # first failure of the current reconnect
        self._attempt = 0
        self.closed = False
        self._connect(replay=False)

    @property
    def turns(self) -> tuple[TurnView, ...]:
        """The server's latest snapshot of the history."""
        return self._turns

    @property
    def history(self) -> tuple[PastTurn, ...]:
        """The same turns with their codes (what a rebuild sends to the next server)."""
        return self._history

    def speak(self, *, user: UserTurn | Sequence[UserTurn] = (), voice: Voice | None = UNCHANGED,
              sampling: SamplingParams | None = None) -> RemoteTurnStream:
        """Start an assistant turn (see `Conversation.speak`). Engine-side refusals
        (AdmissionError, ...) end the returned stream with that error instead of raising."""
        users = (user,) if isinstance(user, UserTurn) else tuple(user)
        for u in users:
            check_user_turn(u, self._engine.config)
        self._check_open()
        users, self._carried = self._carried + users, ()
        msg: dict[str, Any] = {"type": "speak"}
        if voice is not UNCHANGED:
            self.set_voice(voice)
            msg["voice"] = None if self._voice is None else self._voice.key
        if sampling is not None:
            self.set_sampling(sampling)
            msg["sampling"] = wire.sampling_to_wire(self._sampling)
        turn_voice = self._voice
        stream = RemoteTurnStream(self, self._take_turn())
        self._streams[stream.turn_id] = stream
        order = next(self._order)

        def send(replay: bool) -> None:
            if stream.done:  # stopped while no socket was up: nothing to ask for
                self._unanswered.pop(order, None)
                return
            if replay:  # a new socket numbers its turns after every earlier one
                self._streams.pop(stream.turn_id, None)
                stream.turn_id = self._take_turn()
                self._streams[stream.turn_id] = stream
            if "voice" in msg:
                self._send_voice(turn_voice)
            self._send(self._with_audio({**msg, "turn": stream.turn_id}, "users", users,
                                        lambda exc: self._refuse(stream, exc)))
            if replay:
                if stream.text:
                    self._send({"type": "text", "turn": stream.turn_id, "delta": stream.text})
                if stream.text_ended:
                    self._send({"type": "end_text", "turn": stream.turn_id})

        stream._order, stream._users = order, users
        self._request(order, send)
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
        order = next(self._order)

        def fail(exc: BaseException) -> None:
            self._requests.pop(request, None)
            if not reply.done():
                reply.set_exception(exc)

        def send(replay: bool) -> None:
            self._send(self._with_audio({"type": "add_user", "request": request}, None, (user,),
                                        fail))

        reply.add_done_callback(lambda _: self._unanswered.pop(order, None))
        self._request(order, send)
        await reply

    def close(self) -> None:
        """Cancel this conversation's turns and free its place on the server (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._fail_all(StreamCancelled("the conversation was closed"))
        if self._conn is not None:
            self._send({"type": "close"})
            self._conn.close()

    async def aclose(self) -> None:
        self.close()
        if self._conn is not None:
            await self._conn.wait_closed()

    async def __aenter__(self) -> RemoteConversation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- sockets ----------------------------------------------------------------------------
    def _connect(self, *, replay: bool) -> None:
        """Open a socket: `voice` + `hello` (with the history when this is not the first),
        then every unanswered request, in order."""
        self._retry = None
        self._links += 1
        self._refusal = None
        self._voices_sent = set()
        self._past = {}
        url = self._engine.ws_urls[(self._links - 1 + self._attempt) % len(self._engine.ws_urls)]
        conn = Connection(url, self._engine.token, self._on_message,
                          lambda error: self._on_closed(conn, error), session_id=self.session_id)
        self._conn = conn
        self._send_voice(self._voice)
        hello: dict[str, Any] = {
            "type": "hello", "versions": [wire.VERSION], "session": self.session_id,
            "sampling": wire.sampling_to_wire(self._sampling),
            "voice": None if self._voice is None else self._voice.key,
            "turn_base": self._next_turn - 1}
        blobs: list[str | bytes] = []
        if self._history:
            hello["history"] = []
            for turn in self._history:
                codes = wire.codes_to_wire(turn.codes)
                item = wire.past_to_wire(turn, len(codes))
                del item["bytes"]
                hello["history"].append(item)
                if codes:
                    blobs.append(codes)
        self._send(hello)
        conn.send(*blobs)
        for send in list(self._unanswered.values()):
            send(True)
        try:
            conn.start()
        except RuntimeError:  # no running loop yet: opened by the first speak/add_user_turn
            if replay:
                raise

    def _request(self, order: int, send: Callable[[bool], None]) -> None:
        """Send a request now, or on the next socket when none is up."""
        self._unanswered[order] = send
        conn = self._conn
        if conn is not None and not conn.ended:
            send(False)
            self._start()
        elif self._retry is None:  # no reconnect under way: open one now (it sends this too)
            self._progress()
            self._start_connect()

    def _start_connect(self) -> None:
        try:
            self._connect(replay=True)
        except RuntimeError:
            raise RuntimeError("a RemoteConversation is used from a running asyncio loop") from None

    def _send(self, item: dict[str, Any] | Any) -> None:
        if self._conn is not None:
            self._conn.send(wire.dumps(item) if isinstance(item, dict) else item)

    def _start(self) -> None:
        try:
            self._conn.start()  # type: ignore[union-attr]
        except RuntimeError:
            raise RuntimeError("a RemoteConversation is used from a running asyncio loop") from None

    def _send_voice(self, voice: Voice | None) -> None:
        """A voice's codes, once per socket, before the message that names it."""
        if voice is None or voice.key in self._voices_sent:
            return
        self._voices_sent.add(voice.key)
        self._send({"type": "voice", "key": voice.key, "frames": int(voice.codes.shape[0])})
        self._send(wire.codes_to_wire(voice.codes))

    def _take_turn(self) -> int:
        turn, self._next_turn = self._next_turn, self._next_turn + 1
        return turn

    def _with_audio(self, msg: dict[str, Any], field: str | None, users: tuple[UserTurn, ...],
                    on_error: Callable[[BaseException], None]) -> Frames:
        """A frame factory: user audio becomes int16 PCM off the loop's thread, then the
        message and its binary frames go out together, in call order. Audio that cannot be
        read fails its own request (`on_error`), never the socket."""
        max_s = self._engine.config.max_user_audio_s

        async def frames() -> list[str | bytes]:
            entries, blobs = [], []
            for u in users:
                pcm, rate = b"", u.sample_rate
                if u.audio is not None:
                    try:
                        pcm, rate = await asyncio.to_thread(user_pcm, u.audio, u.sample_rate,
                                                            max_s)
                    except Exception as exc:
                        on_error(exc if isinstance(exc, MossError | ValueError) else
                                 InvalidAudioError(f"user audio could not be read: {exc!r}"))
                        return []
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
                self._progress()
                self._unanswered.pop(stream._order, None)  # speaking: never sent again
                stream._put(AudioChunk(data or b"", wire.SAMPLE_RATE, float(msg["start_s"]),
                                       float(msg["duration_s"]), wire.words_from_wire(msg["words"]),
                                       bool(msg["final"])))
        elif kind == "turn_end":
            stream = self._streams.pop(msg.get("turn"), None)  # type: ignore[arg-type]
            if stream is not None:
                self._progress()
                self._unanswered.pop(stream._order, None)
                status = _STATUS.get(msg.get("status"), TurnStatus.FAILED)  # type: ignore[arg-type]
                error = None if msg.get("error") is None else wire.error_from(msg["error"])
                if isinstance(error, AdmissionError):  # refused before it began
                    self._carried += stream._users
                stream._end(status, error, msg)
        elif kind == "past":
            self._past[int(msg["ref"])] = wire.past_from_wire(msg, data)
        elif kind == "turns":
            turns = wire.turns_from_wire(msg.get("turns"))
            try:
                self._history = tuple(self._past[ref] for _, ref in turns)
            except KeyError as exc:
                raise ProtocolError(f"'turns' names a turn no 'past' carried: {exc}") from None
            self._turns = tuple(view for view, _ in turns)
            self._past = {ref: self._past[ref] for _, ref in turns}
        elif kind == "user_added":
            reply = self._requests.pop(msg.get("request"), None)  # type: ignore[arg-type]
            self._progress()
            if reply is not None and not reply.done():
                if msg.get("error") is None:
                    reply.set_result(None)
                else:
                    reply.set_exception(wire.error_from(msg["error"]))
        elif kind == "welcome":
            self._welcomed(msg)
        elif kind == "error":
            error = wire.error_from(msg.get("error"))
            stream = self._streams.get(msg.get("turn"))  # type: ignore[arg-type]
            if stream is not None:
                stream._refused(error)
            else:  # a refused hello, or an error that ends the socket: it closes next
                self._refusal = error
                log.warning("the engine server reported: %r", error)

    def _refuse(self, stream: RemoteTurnStream, error: BaseException) -> None:
        """A turn refused here (its user audio could not be read): it ends before it began."""
        stream._refused_here = True
        self._unanswered.pop(stream._order, None)
        self._streams.pop(stream.turn_id, None)
        stream._end(TurnStatus.FAILED, error)

    def _progress(self) -> None:
        """A request was answered: the socket works, the next loss starts a new reconnect."""
        self._attempt, self._lost_at = 0, None

    def _welcomed(self, msg: dict[str, Any]) -> None:
        previous, self.server = self.server, msg.get("server")
        if not self._unanswered:  # else only an answer proves this socket works
            self._progress()
        self._engine._apply_limits(msg.get("limits"))
        if self._links == 1 and not msg.get("resumed"):
            return
        if msg.get("resumed"):
            self.resumes += 1
            log.info("conversation %s resumed on %s", self.session_id, self.server)
        else:
            self.rebuilds += 1
            log.warning("conversation %s rebuilt on server %s from %d turns (it was on %s)",
                        self.session_id, self.server, len(self._history), previous)
        if self._engine.on_reconnect is not None:
            self._engine.on_reconnect(self, bool(msg.get("resumed")))

    def _on_closed(self, conn: Connection, error: BaseException | None) -> None:
        """A socket ended: turns already speaking end with the reason; unless the end is for
        good (closed here, a protocol error, a refused token), reconnect and send again what
        is unanswered."""
        if conn is not self._conn:
            return
        error = self._refusal or error
        if self.closed:
            return
        if self._engine.closed:
            self._fatal = EngineClosed("the engine was closed")
        elif isinstance(error, ProtocolError):
            self._fatal = error
        if self._fatal is not None:
            self._fail_all(self._fatal)
            return
        if isinstance(error, AdmissionError):  # a full or draining server: the next request tries
            for stream in self._streams.values():  # again, with the user turns of these
                if stream._order in self._unanswered:
                    self._carried += stream._users
            self._fail_all(error)
            return
        lost = StreamFailed(f"the connection to the engine server was lost mid-turn "
                            f"({error or 'closed'}); the conversation continues on a new one")
        for stream in [s for s in self._streams.values() if s.status is TurnStatus.ACTIVE]:
            self._streams.pop(stream.turn_id, None)
            stream._end(TurnStatus.FAILED, lost)
        now = time.monotonic()
        self._lost_at = self._lost_at or now
        if not self._unanswered and self.server is not None and self._attempt == 0:
            return  # nothing waits: the next request reconnects
        if now - self._lost_at > self._engine.reconnect_timeout_s:
            self._fail_all(StreamFailed(f"no engine server answered for "
                                        f"{self._engine.reconnect_timeout_s:g} s: {error}"))
            return
        delay = 0.0 if self._attempt == 0 else min(0.05 * 2 ** self._attempt, 2.0)
        self._attempt += 1
        self._retry = asyncio.get_running_loop().call_later(delay, self._start_connect)

    def _engine_closed(self) -> None:
        """The client was closed: everything open ends with EngineClosed."""
        self._fatal = EngineClosed("the engine was closed")
        if self._retry is not None:
            self._retry.cancel()
        self._fail_all(self._fatal)

    def _fail_all(self, error: BaseException) -> None:
        self._unanswered.clear()
        self._progress()
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
