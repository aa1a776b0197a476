"""Conversations between two sockets: a client whose connection dropped comes back with the
same session id (a sticky router sends it to this server) and finds its conversation, KV cache
and recent turns as it left them; if it does not come back within the grace time, the
conversation is closed. A reconnect while the old socket still looks alive takes it over."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from core.engine.conversation import Conversation
    from core.engine.stream import TurnStream


@dataclass
class Parked:
    """What a socket leaves behind for the next one of its session."""

    conv: Conversation
    streams: OrderedDict[int, TurnStream]  # recent turns, still addressable by `played`
    last_turn: int


class Holder(Protocol):
    """A live socket holding a session (`core.server.session.Session`)."""

    async def hand_over(self) -> Parked | None: ...


class SessionTable:
    """Session id -> the socket holding it, or what a dropped socket parked (one event loop)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._live: dict[str, Holder] = {}
        self._parked: dict[str, tuple[Parked, asyncio.TimerHandle]] = {}

    async def claim(self, session_id: str, holder: Holder) -> Parked | None:
        """Make `holder` the session's socket; what the session had here, if anything."""
        previous = self._live.pop(session_id, None)
        parked = await previous.hand_over() if previous is not None else None
        if parked is None and session_id in self._parked:
            parked, timer = self._parked.pop(session_id)
            timer.cancel()
        self._live[session_id] = holder
        return parked

    def release(self, session_id: str, holder: Holder, parked: Parked | None) -> None:
        """The socket ended; `parked` (None: nothing to keep) waits `grace_s` for a reconnect."""
        if self._live.get(session_id) is holder:
            del self._live[session_id]
        if parked is None:
            return
        timer = asyncio.get_running_loop().call_later(self.grace_s, self._expire, session_id)
        self._parked[session_id] = (parked, timer)

    def _expire(self, session_id: str) -> None:
        entry = self._parked.pop(session_id, None)
        if entry is not None:
            entry[0].conv.close()

    def close_all(self) -> None:
        for parked, timer in self._parked.values():
            timer.cancel()
            parked.conv.close()
        self._parked.clear()

    @property
    def parked(self) -> int:
        return len(self._parked)
