"""Conversation: the caller's handle on one room or call, a thin object over engine commands.

Each `speak()` sends one request that carries everything the turn needs: the user turns before
it, the voice and the sampling (both apply from that turn on). The engine runs a conversation's
requests in the order they were made, so a caller never has to serialise them itself. The
history lives on the engine thread (`core.history.History`); `turns` is its latest snapshot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from core.audio import inspect_audio
from core.engine.commands import AddUserTurn, PendingUser, Reply, Speak
from core.engine.stream import TurnStream
from core.errors import EngineClosed, TextTooLongError
from core.values import PastTurn, SamplingParams, UserTurn, Voice

if TYPE_CHECKING:
    from torch import Tensor

    from core.engine.commands import TurnsView
    from core.engine.config import EngineConfig
    from core.engine.inbox import Inbox
    from core.history import TurnView

UNCHANGED: Any = object()  # `speak(voice=...)` not given: the conversation keeps its voice

EncodeUser = Callable[[Any, "int | None"], "Future[Tensor]"]


def opening_settings(voice: Voice | None,
                     sampling: SamplingParams | None) -> tuple[Voice | None, SamplingParams]:
    """A new conversation's voice and sampling, checked, with a seed drawn when none is given
    (one random stream per conversation, continued across its turns; known to the caller at
    once, in process and over the wire alike)."""
    sampling = sampling or SamplingParams()
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be SamplingParams, got {sampling!r}")
    if voice is not None and not isinstance(voice, Voice):
        raise TypeError(f"voice must be a Voice (engine.load_voice) or None, got {voice!r}")
    if sampling.seed is None:
        sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
    return voice, sampling


class NextTurnSettings:
    """The voice and sampling the next `speak()` request carries (caller side: both handles,
    in-process and remote, send them with every turn)."""

    def __init__(self, voice: Voice | None, sampling: SamplingParams) -> None:
        self._voice, self._sampling = voice, sampling

    @property
    def voice(self) -> Voice | None:
        """The voice of the next turn."""
        return self._voice

    def set_voice(self, voice: Voice | None) -> None:
        """Change the voice from the next turn on (the history is prefilled again after the
        system block)."""
        if voice is not None and not isinstance(voice, Voice):
            raise TypeError(f"voice must be a Voice or None, got {voice!r}")
        self._voice = voice

    @property
    def sampling(self) -> SamplingParams:
        """The sampling of the next turn (its seed is the conversation's random stream)."""
        return self._sampling

    def set_sampling(self, sampling: SamplingParams) -> None:
        """Change the sampling from the next turn on. A `seed` of None keeps the conversation's
        random stream going; a seed restarts it there."""
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {sampling!r}")
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=self._sampling.seed)
        self._sampling = sampling


class Conversation(NextTurnSettings):
    """One room or call: a voice, sampling settings and the dialogue so far.

    Create with `engine.conversation(voice=..., sampling=...)`. Methods may be called from any
    thread and any asyncio loop.
    """

    def __init__(self, inbox: Inbox, conv_id: int, view: TurnsView, *, voice: Voice | None,
                 sampling: SamplingParams, config: EngineConfig, encode_user: EncodeUser) -> None:
        super().__init__(voice, sampling)
        self._inbox, self.conv_id, self._view = inbox, conv_id, view
        self._config, self._encode_user = config, encode_user
        self.session_id = f"local-{conv_id}"  # the caller's name for it (Engine.conversation)
        self.closed = False

    @property
    def turns(self) -> tuple[TurnView, ...]:
        """The turns in the history now (the oldest may have been trimmed)."""
        return self._view.turns

    @property
    def history(self) -> tuple[PastTurn, ...]:
        """The same turns with their codes: `engine.conversation(history=...)` on another
        engine continues this conversation there."""
        return self._view.past

    def on_turns_changed(self, callback: Callable[[], None] | None) -> None:
        """Call `callback()` (on the engine thread: keep it short, e.g. a
        `loop.call_soon_threadsafe`) whenever `turns` changes; None removes it."""
        self._view.listener = callback

    def speak(
        self,
        *,
        user: UserTurn | Sequence[UserTurn] = (),
        voice: Voice | None = UNCHANGED,
        sampling: SamplingParams | None = None,
    ) -> TurnStream:
        """Start an assistant turn (queued behind this conversation's earlier requests).

        `user`: what the user said since the last turn, added first (speech is encoded on the
        engine's encoder thread). `voice` / `sampling`: as `set_voice` / `set_sampling`, from
        this turn on.

        Raises:
            AdmissionError: `max_streams` conversations are already speaking, or this one has
                `max_turns_per_conversation` turns queued.
            EngineClosed: the engine or this conversation was closed.
            TypeError, ValueError, TextTooLongError, InvalidAudioError: a user turn that cannot
                be used (nothing is queued then).
        """
        users = (user,) if isinstance(user, UserTurn) else tuple(user)
        for u in users:
            check_user_turn(u, self._config)
        if voice is not UNCHANGED:
            self.set_voice(voice)
        if sampling is not None:
            self.set_sampling(sampling)
        self._check_open()
        stream = TurnStream(self._inbox, self._inbox.admit_turn(self.conv_id),
                            self._config.max_text_chars)
        try:
            pending = tuple(self._pending(u) for u in users)
            self._inbox.post(Speak(self.conv_id, stream, self._voice, self._sampling, pending))
        except BaseException:
            self._inbox.release_turn(stream.turn_id)
            raise
        return stream

    async def add_user_turn(
        self, text: str = "", audio: Any = None, sample_rate: int | None = None
    ) -> None:
        """Add what the user said: text, and their speech when given (int16 bytes or an array
        with `sample_rate`, or an audio file), encoded on the engine's encoder thread.

        The turn goes after the requests already queued on this conversation, so this returns
        once the active assistant turn (if any) has ended and the user turn is in the history.
        `speak(user=...)` does the same without a wait of its own.

        Raises:
            ValueError: neither text nor audio (InvalidAudioError for unusable audio).
            TextTooLongError: more than `max_text_chars` characters.
        """
        user = UserTurn(text, audio, sample_rate)
        check_user_turn(user, self._config)
        self._check_open()
        reply = Reply(asyncio.get_running_loop())
        self._inbox.post(AddUserTurn(self.conv_id, self._pending(user), reply))
        await reply.fut

    def close(self) -> None:
        """Cancel this conversation's turns and free its cache (idempotent)."""
        if not self.closed:
            self.closed = True
            self._inbox.close_conversation(self.conv_id)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Conversation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- helpers --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise EngineClosed("this conversation was closed")

    def _pending(self, user: UserTurn) -> PendingUser:
        codes = None if user.audio is None else self._encode_user(user.audio, user.sample_rate)
        return PendingUser(user.text, codes)


def check_user_turn(user: UserTurn, config: EngineConfig) -> None:
    """What can be refused without decoding, refused at the call (type, text length, audio
    rate, shape and length): the in-process and the remote conversation alike."""
    if not isinstance(user, UserTurn):
        raise TypeError(f"user turns must be UserTurn, got {user!r}")
    text = user.text
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if len(text) > config.max_text_chars:
        raise TextTooLongError(f"user text has {len(text)} characters, max_text_chars="
                               f"{config.max_text_chars}")
    if user.audio is None and not text.strip():
        raise ValueError("a user turn needs text or audio")
    if user.audio is not None:
        inspect_audio(user.audio, user.sample_rate, max_seconds=config.max_user_audio_s,
                      limit="max_user_audio_s")
