"""KV pool room on the engine thread: admission by the blocks a whole turn needs, and eviction
before each step.

A turn starts only when the pool can hold its whole turn beside the turns already speaking
(`admit`), and before each step idle conversations' caches and ready voice prefixes are evicted,
least recently used first, until the step's blocks are free (`make_room`). Evicted caches are
rebuilt from the conversations' histories at their next turn, so pool pressure costs time, never
a running turn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from core.engine.conv_state import ConvState
from core.engine.metrics import Metrics
from core.engine.prefix import PrefixKVCache
from core.engine.sequence import KVSequence
from core.errors import CapacityError
from core.model import KVPool

log = logging.getLogger("core.engine")

# Blocks a turn may take beyond ceil(rows / block size): one copy-on-write copy of a shared
# partial block (after a cut inside a shared prefix) and the partial block of the voice prefix
# it forks (kept by the prefix cache beside the turn's own copy).
KV_MARGIN_BLOCKS = 2


@dataclass(slots=True)
class KVBudget:
    """Pool blocks promised at admission: held now or still to be taken by speaking turns."""

    committed: int
    held: set[int]  # blocks held by speaking turns and prefixes being prefilled


class KVRoom:
    """Admission budget and eviction over one KV pool (engine thread only)."""

    def __init__(self, kv: KVPool, prefixes: PrefixKVCache, metrics: Metrics, *,
                 wait_s: float) -> None:
        self.kv, self.prefixes, self.metrics, self.wait_s = kv, prefixes, metrics, wait_s
        self.block_size = kv.block_size

    def blocks(self, rows: int) -> int:
        """Most blocks a turn whose sequence ends at `rows` rows can take from the pool."""
        return -(-rows // self.block_size) + KV_MARGIN_BLOCKS

    def max_context_rows(self) -> int:
        """The context budget the pool can hold for one turn alone (a conversation's history is
        trimmed to it, so no turn is too big for the pool)."""
        return max(1, (self.kv.num_blocks - KV_MARGIN_BLOCKS) * self.block_size)

    # -- admission ------------------------------------------------------------------------------
    def budget(self, speaking: list[tuple[KVSequence | None, int]]) -> KVBudget:
        """Blocks promised to the speaking turns ((its cache, its most blocks) each) and to
        voice prefixes being prefilled: what no eviction can free before they end. Shared
        prefix blocks count once."""
        held: set[int] = set()
        growth = 0
        for seq, most in speaking:
            table = self.kv.table(seq.seq_id) if seq is not None else []
            held.update(table)
            growth += max(0, most - len(table))
        for entry in self.prefixes.unready():
            table = self.kv.table(entry.seq.seq_id)
            held.update(table)
            growth += max(0, -(-int(entry.rows.shape[0]) // self.block_size) - len(table))
        return KVBudget(len(held) + growth, held)

    def admit(self, cs: ConvState, reserve_rows: int, budget: KVBudget) -> int | None:
        """The blocks to keep for the conversation's next turn, or None while they do not fit
        beside `budget` (which then counts them, for the next turn started in the same tick)."""
        blocks = self.blocks(cs.history.rows_needed(reserve_rows))
        new = blocks - len(budget.held.intersection(self._shared_prefix(cs)))
        if budget.committed + new > self.kv.num_blocks:
            return None
        budget.committed += new
        return blocks

    @staticmethod
    def admission_order(convs: list[ConvState]) -> list[ConvState]:
        """Conversations, those whose turn waits longest for room first (FIFO under pressure)."""
        if any(cs.room_wait is not None for cs in convs):
            convs = sorted(convs, key=lambda cs: (0, cs.room_wait[1]) if cs.room_wait else (1, 0.0))
        return convs

    def wait(self, cs: ConvState, now: float) -> CapacityError | None:
        """Keep the conversation's next turn (the head of its queue) waiting for room, at most
        `wait_s`; then the retryable `CapacityError` it ends with (before any audio)."""
        head = cs.queue[0]
        if cs.room_wait is None or cs.room_wait[0] is not head:
            cs.room_wait = (head, now)  # type: ignore[assignment]
            self.metrics.add("capacity_waits")
        waited = now - cs.room_wait[1]
        if waited < self.wait_s:
            return None
        cs.room_wait = None
        self.metrics.add("capacity_refusals")
        return CapacityError(
            f"the KV pool ({self.kv.num_blocks} blocks of {self.block_size} rows) could not "
            f"hold this turn beside the turns speaking for {waited:.1f} s (kv_wait_s); retry")

    def _shared_prefix(self, cs: ConvState) -> list[int]:
        """Full blocks of the voice prefix the turn will share: its cache's, or those of the
        ready prefix entry it will fork."""
        full = cs.history.prefix_len() // self.block_size
        if cs.kv is not None and cs.holds_own_prefix():
            return self.kv.table(cs.kv.seq_id)[:full]
        voice = cs.history.voice
        entry = self.prefixes.get(None if voice is None else voice.key)
        if entry is not None and entry.ready:
            return self.kv.table(entry.seq.seq_id)[:full]
        return []

    # -- before each step -----------------------------------------------------------------------
    def make_room(self, seq_ids: list[int], rows: list[int],
                  idle: Callable[[], list[ConvState]]) -> None:
        """Evict until appending `rows[i]` rows to `seq_ids[i]` fits: `idle()` conversations'
        caches (least recently used first), then cached voice prefixes (their blocks stay with
        the conversations that forked them)."""
        kv = self.kv
        # Each sequence takes at most ceil(n / block) blocks plus one copy-on-write copy.
        if kv.rows_free >= sum(rows) + 2 * self.block_size * len(rows):
            return
        victims = self._victims(idle)
        while kv.free_blocks < kv.blocks_needed(seq_ids, rows):
            if not next(victims, False):
                return  # nothing left to evict: the step fails and says why

    def free_one_block(self, idle: Callable[[], list[ConvState]]) -> None:
        """Room for the partial block a prefix fork copies."""
        victims = self._victims(idle)
        while self.kv.free_blocks < 1 and next(victims, False):
            pass

    def _victims(self, idle: Callable[[], list[ConvState]]) -> Iterator[bool]:
        """Evict one cache per step of the iteration (True each time)."""
        for cs in idle():
            cs.release_kv(evicted=True)
            self.metrics.add("kv_evictions")
            log.debug("evicted the KV cache of idle conversation %d", cs.conv_id)
            yield True
        for entry in self.prefixes.evictable():
            self.prefixes.drop(entry)
            self.metrics.add("prefix_evictions")
            log.debug("evicted the cached prefix of voice %s", entry.key)
            yield True
