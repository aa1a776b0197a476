"""RemoteEngine: the `Engine` interface the plugins use, served by `moss-tts serve`.

`RemoteEngine(url, token=...)` goes where an `Engine` went: `load_voice` posts the reference
audio once and keeps the codes (a voice is then sent to the server by its codes), and every
`conversation()` is one WebSocket opened in the background on the caller's asyncio loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from core import wire
from core.audio import REFERENCE_MAX_SECONDS, AudioSource, inspect_audio
from core.engine.config import EngineConfig
from core.engine.conversation import opening_settings
from core.errors import EngineClosed, InvalidAudioError, StreamFailed
from core.remote.audio import voice_body
from core.remote.conversation import RemoteConversation
from core.remote.post import post
from core.values import PastTurn, SamplingParams, Voice

log = logging.getLogger("core.remote")


class RemoteEngine:
    """A network engine with `Engine`'s public interface (docs/ARCHITECTURE.md).

    `url` is the server's base, `http(s)://host:port` or `ws(s)://host:port` (a load
    balancer's or Ray Serve's), or a list of servers tried in turn when one is unreachable.
    `config` gives the limits checked on this side before the first `welcome` (then the
    server's own `max_text_chars`, `max_user_audio_s` and `cuttable_turns` replace them).

    A conversation whose socket drops reconnects (backoff, for up to `reconnect_timeout_s`)
    and is resumed by a server that still has it, or rebuilt by another from the history the
    client holds; `on_reconnect(conv, resumed)` is called then, and the client logs it.
    """

    def __init__(self, url: str | Sequence[str], *, token: str,
                 config: EngineConfig | None = None, voice_timeout_s: float = 120.0,
                 reconnect_timeout_s: float = 15.0,
                 on_reconnect: Callable[[RemoteConversation, bool], None] | None = None) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("RemoteEngine needs the server's token")
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("RemoteEngine needs at least one server url")
        self.http_urls, self.ws_urls = zip(*(_urls(u) for u in urls), strict=True)
        self.token = token
        self.config = config or EngineConfig()
        self._voice_timeout_s = voice_timeout_s
        if not reconnect_timeout_s >= 0:
            raise ValueError(f"reconnect_timeout_s must be >= 0, got {reconnect_timeout_s}")
        self.reconnect_timeout_s = reconnect_timeout_s
        self.on_reconnect = on_reconnect
        self._convs: list[RemoteConversation] = []
        self._closed = False

    # -- voices -----------------------------------------------------------------------------
    def check_voice(self, source: AudioSource, sample_rate: int | None = None) -> None:
        """Refuse reference audio that cannot be used, without decoding it (as `Engine`)."""
        inspect_audio(source, sample_rate, name="source", max_seconds=REFERENCE_MAX_SECONDS)

    async def load_voice(self, source: AudioSource, sample_rate: int | None = None) -> Voice:
        """Upload reference audio; the server validates and encodes it (`POST /v1/voices`).

        Raises:
            InvalidAudioError: what `Engine.load_voice` refuses (checked here when it needs no
                decoding, else by the server), or an upload over the server's size limit.
            ProtocolError: a wrong token. StreamFailed: the server cannot be reached.
        """
        self._check_open()
        self.check_voice(source, sample_rate)
        body, rate = await asyncio.to_thread(voice_body, source, sample_rate)
        query = "" if rate is None else "?" + urlencode({"sample_rate": rate})
        for i, http_url in enumerate(self.http_urls):
            try:
                status, headers, data = await post(
                    f"{http_url}/v1/voices{query}", body,
                    {"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/octet-stream"}, timeout_s=self._voice_timeout_s)
                break
            except (OSError, TimeoutError) as exc:
                if i == len(self.http_urls) - 1:
                    raise StreamFailed(f"voice upload to {http_url} failed: {exc!r}") from exc
        if status != 200:
            raise _http_error(status, data)
        return _voice_from(headers, data)

    # -- conversations ----------------------------------------------------------------------
    def conversation(self, voice: Voice | None = None, sampling: SamplingParams | None = None,
                     history: Sequence[PastTurn] = (), *,
                     session_id: str | None = None) -> RemoteConversation:
        """Open a conversation (its socket opens in the background on the running loop; a
        full server ends its first turn with `AdmissionError`). `session_id` (default: a
        random one) is sent with every connection of the conversation, so a sticky router
        sends its reconnects to the same server (LiveKit: the job id; Pipecat: the call id).
        `history` continues a conversation another engine had (as `Engine.conversation`)."""
        self._check_open()
        if session_id is not None and (not isinstance(session_id, str)
                                       or not 0 < len(session_id) <= 128):
            raise ValueError(f"session_id must be a string of 1..128 characters, got {session_id!r}")
        conv = RemoteConversation(self, *opening_settings(voice, sampling),
                                  session_id=session_id or uuid.uuid4().hex,
                                  history=_checked_history(history))
        self._convs = [c for c in self._convs if not c.closed]
        self._convs.append(conv)
        return conv

    def close(self) -> None:
        """Close every conversation of this client (idempotent)."""
        self._closed = True
        for conv in self._convs:
            conv._engine_closed()
            conv.close()
        self._convs.clear()

    async def aclose(self) -> None:
        convs = list(self._convs)
        self.close()
        await asyncio.gather(*(c._conn.wait_closed() for c in convs if c._conn is not None),
                             return_exceptions=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("the engine was closed")

    def _apply_limits(self, limits: object) -> None:
        """The server's limits from `welcome` replace the configured ones."""
        if not isinstance(limits, dict):
            return
        changes: dict[str, Any] = {}
        for name, kind in (("max_text_chars", int), ("max_user_audio_s", float),
                           ("cuttable_turns", int)):
            value = limits.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and \
                    math.isfinite(value) and value > 0:
                changes[name] = kind(value)
        try:
            self.config = dataclasses.replace(self.config, **changes)
        except ValueError as exc:
            log.warning("ignoring the server's limits %r: %s", limits, exc)


def _checked_history(history: Sequence[PastTurn]) -> tuple[PastTurn, ...]:
    """What can be checked without the model (the server checks ids and code ranges)."""
    turns = tuple(history)
    for i, turn in enumerate(turns):
        if not isinstance(turn, PastTurn):
            raise TypeError(f"history[{i}] must be a PastTurn, got {type(turn).__name__}")
        if turn.role not in ("user", "assistant"):
            raise ValueError(f"history[{i}].role must be 'user' or 'assistant', got {turn.role!r:.40}")
    return turns


def _urls(url: str) -> tuple[str, str]:
    """(http base, conversation socket url) of one server."""
    parts = urlsplit(url.rstrip("/"))
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise ValueError(f"RemoteEngine url must be http(s):// or ws(s)://host:port, got {url!r}")
    secure = parts.scheme in ("https", "wss")
    return (urlunsplit(("https" if secure else "http", parts.netloc, parts.path, "", "")),
            urlunsplit(("wss" if secure else "ws", parts.netloc, parts.path + "/v1/conversation",
                        "", "")))


def _voice_from(headers: dict[str, str], data: bytes) -> Voice:
    """A `Voice` from the answer to `POST /v1/voices`."""
    key, duration = headers.get("x-voice-key"), headers.get("x-voice-duration")
    row = wire.CODEBOOKS * 2
    if not key or duration is None or not data or len(data) % row:
        raise StreamFailed("the server's voice answer is malformed")
    return Voice(wire.codes_from_wire(data), key, float(duration))


def _http_error(status: int, data: bytes) -> Exception:
    try:
        obj = json.loads(data)
    except ValueError:
        obj = {"type": "StreamFailed", "message": f"HTTP {status}: {data[:200]!r}"}
    error = wire.error_from(obj)
    if status == 413 and not isinstance(error, InvalidAudioError):
        return InvalidAudioError(str(error))
    return error
