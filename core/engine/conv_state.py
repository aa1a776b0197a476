"""ConvState: the engine thread's record of one conversation.

Its canonical history (`core.history.History`), the KV cache of a prefix of that history, its
FIFO of requests (user turns and assistant turns, in the order the caller made them), the turn
speaking now, the recent finished turns a late `mark_played` can still cut, and its random
stream (sampling and the frame counter that continues across turns).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

from torch import Tensor

from core.engine.sequence import KVSequence
from core.errors import ContextOverflowError
from core.history import History
from core.model import KVPool
from core.values import SamplingParams

if TYPE_CHECKING:
    from core.engine.commands import AddUserTurn, Speak, TurnsView
    from core.engine.turn import TurnState

log = logging.getLogger("core.engine")


class ConvState:
    """One conversation on the engine thread (only that thread touches it)."""

    def __init__(self, conv_id: int, history: History, sampling: SamplingParams,
                 view: TurnsView, *, cuttable_turns: int) -> None:
        self.conv_id, self.history, self.sampling, self.view = conv_id, history, sampling, view
        self.kv: KVSequence | None = None  # a cache of a prefix of `history.rows()`
        self.kv_evicted = False  # the cache was evicted and not rebuilt yet (metrics)
        self.queue: deque[Speak | AddUserTurn] = deque()
        self.active: TurnState | None = None
        # Recent finished turns, newest last: a late mark_played still cuts them (a reply
        # spoken as several turns is heard, and interrupted, after all are generated).
        self.finished: deque[TurnState] = deque(maxlen=cuttable_turns)
        self.counter = 0  # frames drawn: the conversation's random stream spans its turns
        self.last_used = 0.0
        # (request at the head of the queue, since when) while it waits for KV pool room
        self.room_wait: tuple[Speak, float] | None = None

    def publish(self) -> None:
        """Show the caller the turns as they are now (and tell its listener, if any)."""
        view = self.view
        view.past, view.turns = self.history.past(), self.history.view()
        listener = view.listener
        if listener is not None:
            try:
                listener()
            except Exception:  # a caller's hook never stops the engine thread
                log.exception("turns listener failed")

    @property
    def seq_id(self) -> int | None:
        return None if self.kv is None else self.kv.seq_id

    def kv_rows(self) -> Tensor | None:
        """The rows in the KV cache (tests and debugging)."""
        return None if self.kv is None else self.kv.rows()

    def holds_own_prefix(self) -> bool:
        """True when the cache holds the current voice's system+voice prefix."""
        prefix = self.history.prefix()
        return self.kv is not None and self.kv.holds(prefix, int(prefix.shape[0]))

    def sync_kv(self, pool: KVPool, target: Tensor, prefix: KVSequence | None) -> Tensor:
        """Bring the cache to a prefix of `target`; return the rows still to prefill.

        With a ready voice `prefix` that starts `target` and covers more than the cache keeps,
        the cache becomes a fork of it (its rows are not computed again).
        """
        self.kv_evicted = False  # rebuilt from here on
        if prefix is not None:
            n = prefix.length
            own = self.kv is not None and self.kv.holds(target, n)
            if not own and prefix.holds(target, n):
                try:
                    fork = prefix.fork(n)
                except ContextOverflowError:  # no block for the copy (KVPoolExhausted): prefill
                    pass
                else:
                    self.release_kv()
                    self.kv = fork
                    return target[n:]
        if self.kv is None:
            self.kv = KVSequence.new(pool)
        return self.kv.cut_to(target)

    def release_kv(self, *, evicted: bool = False) -> None:
        """Give the cache back (evicted, closed or replaced by a fork); its rows can always be
        prefilled again."""
        if self.kv is not None:
            self.kv.free()
            self.kv = None
            self.kv_evicted = evicted
