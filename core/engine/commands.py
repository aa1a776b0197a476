"""Typed commands: the one way from callers (any thread, any loop) to the engine thread.

A caller builds a command and posts it to the `Inbox`; the engine thread runs them in order
at the start of each tick. Results come back one way too: chunks through a stream's channel,
and a `Reply` resolved on the caller's own loop. A turn's request carries everything it needs
(voice, sampling, the user turns before it), so a remote engine needs one message per turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # light at run time: streams import this module
    from torch import Tensor

    from core.engine.stream import TurnStream
    from core.history import History, TurnView
    from core.values import PastTurn, SamplingParams, Voice


class Reply:
    """A result an asyncio caller awaits in its own loop, resolved from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fut: asyncio.Future[Any] = loop.create_future()

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        fut = self.fut

        def settle() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop is gone
            pass


@dataclass(frozen=True, slots=True)
class PendingUser:
    """A user turn whose speech (if any) the encoder thread is turning into codes."""

    text: str
    codes: Future[Tensor] | None = None

    @property
    def ready(self) -> bool:
        return self.codes is None or self.codes.done()


class TurnsView:
    """The conversation's turns as its handle shows them: replaced whole by the engine thread
    (an atomic swap), read by the caller; `listener` (set by the caller) is told of each change
    on the engine thread, so a server need not poll."""

    __slots__ = ("turns", "past", "listener")

    def __init__(self, turns: tuple[TurnView, ...] = (), past: tuple[PastTurn, ...] = ()) -> None:
        self.turns, self.past = turns, past
        self.listener: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class OpenConversation:
    conv_id: int
    history: History
    sampling: SamplingParams
    view: TurnsView


@dataclass(frozen=True, slots=True)
class CloseConversation:
    conv_id: int


@dataclass(eq=False, slots=True)
class Speak:
    """One assistant turn: the user turns before it, then the turn with this voice and sampling
    (both apply from this turn on)."""

    conv_id: int
    stream: TurnStream
    voice: Voice | None
    sampling: SamplingParams
    users: tuple[PendingUser, ...] = ()
    applied: bool = field(default=False)  # users added, voice and sampling set

    @property
    def ready(self) -> bool:
        return all(u.ready for u in self.users)


@dataclass(eq=False, slots=True)
class AddUserTurn:
    """A user turn on its own (`Conversation.add_user_turn`), answered once it is in the history."""

    conv_id: int
    user: PendingUser
    reply: Reply

    @property
    def ready(self) -> bool:
        return self.user.ready


@dataclass(frozen=True, slots=True)
class StopTurn:
    """Stop generating (a queued turn never starts); with `played_s`, also `MarkPlayed`."""

    stream: TurnStream
    played_s: float | None = None


@dataclass(frozen=True, slots=True)
class MarkPlayed:
    """The listener heard the first `played_s` seconds of the turn: the history keeps that."""

    stream: TurnStream
    played_s: float


Command = OpenConversation | CloseConversation | Speak | AddUserTurn | StopTurn | MarkPlayed
