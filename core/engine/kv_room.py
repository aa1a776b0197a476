"""KV pool room on the engine thread: admission by the blocks a whole turn needs, and eviction
before each step.

`KVRoom` keeps the KV pool able to serve every speaking turn to its end: a turn starts only
when the pool can hold its whole turn beside the turns already speaking (`admit`), and before
each step idle conversations' caches and ready voice prefixes are evicted, least recently used
first, until the step's blocks are free (`make_room`). Evicted caches are rebuilt from the
conversations' rows at their next turn, so pool pressure costs time, never a running turn.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import CapacityError

if TYPE_CHECKING:
    from core.engine.stream import TurnStream
    from core.engine.worker import ConvState, Worker

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
    """KV pool room on the engine thread: admission budget and eviction before each step."""

    def __init__(self, worker: Worker) -> None:
        self.worker, self.kv, self.metrics = worker, worker.kv, worker.metrics
        self.block_size = worker.kv.block_size

    def blocks(self, rows: int) -> int:
        """Most blocks a turn whose sequence ends at `rows` rows can take from the pool."""
        return -(-rows // self.block_size) + KV_MARGIN_BLOCKS

    def max_context_rows(self) -> int:
        """The context budget the pool can hold for one turn alone (a conversation's history is
        trimmed to it, so no turn is too big for the pool)."""
        return max(1, (self.kv.num_blocks - KV_MARGIN_BLOCKS) * self.block_size)

    # -- admission ------------------------------------------------------------------------------
    def budget(self) -> KVBudget:
        """Blocks promised to speaking turns and voice prefixes being prefilled: what no
        eviction can free before they end. Shared prefix blocks count once."""
        held: set[int] = set()
        growth = 0
        for turn in self.worker.active.values():
            seq = self.worker.context(turn).seq_id
            table = self.kv.table(seq) if seq is not None else []
            held.update(table)
            growth += max(0, turn.kv_blocks - len(table))
        for entry in self.worker.prefix_kv.unready():
            table = self.kv.table(entry.seq_id)
            held.update(table)
            growth += max(0, -(-int(entry.rows.shape[0]) // self.block_size) - len(table))
        return KVBudget(len(held) + growth, held)

    def admit(self, cs: ConvState, reserve_rows: int, budget: KVBudget) -> int | None:
        """The blocks to keep for the conversation's next turn, or None while they do not fit
        beside `budget` (which then counts them, for the next turn started in the same tick)."""
        blocks = self.blocks(cs.conv.context.rows_needed(reserve_rows))
        new = blocks - len(budget.held.intersection(self._shared_prefix(cs)))
        if budget.committed + new > self.kv.num_blocks:
            return None
        budget.committed += new
        return blocks

    def admission_order(self) -> list[ConvState]:
        """Conversations, those whose turn waits longest for room first (FIFO under pressure)."""
        convs = list(self.worker.convs.values())
        if any(cs.room_wait is not None for cs in convs):
            convs.sort(key=lambda cs: (0, cs.room_wait[1]) if cs.room_wait else (1, 0.0))
        return convs

    def wait(self, cs: ConvState, stream: TurnStream, now: float) -> bool:
        """Keep the conversation's next turn queued until room frees up, at most `kv_wait_s`;
        True when it was refused with `CapacityError` (before any audio: retryable)."""
        if cs.room_wait is None or cs.room_wait[0] is not stream:
            cs.room_wait = (stream, now)
            self.metrics.add("capacity_waits")
        waited = now - cs.room_wait[1]
        if waited < self.worker.config.kv_wait_s:
            return False
        cs.queue.popleft()
        cs.room_wait = None
        self.metrics.add("capacity_refusals")
        self.worker.turn_over(stream, CapacityError(
            f"the KV pool ({self.kv.num_blocks} blocks of {self.block_size} rows) could not "
            f"hold this turn beside the turns speaking for {waited:.1f} s (kv_wait_s); retry"))
        return True

    def _shared_prefix(self, cs: ConvState) -> list[int]:
        """Full blocks of the voice prefix the turn will share: its cache's, or those of the
        ready prefix entry it will fork."""
        ctx = cs.conv.context
        full = ctx.prefix_len() // self.block_size
        if ctx.seq_id is not None and ctx.holds_own_prefix():
            return self.kv.table(ctx.seq_id)[:full]
        entry = self.worker.prefix_kv.get(None if ctx.voice is None else ctx.voice.key)
        if entry is not None and entry.ready:
            return self.kv.table(entry.seq_id)[:full]
        return []

    # -- before each step -----------------------------------------------------------------------
    def make_room(self, seq_ids: list[int], rows: list[int]) -> None:
        """Evict until appending `rows[i]` rows to `seq_ids[i]` fits: idle conversations' caches
        (least recently used first), then cached voice prefixes (their blocks stay with the
        conversations that forked them)."""
        kv = self.kv
        # Each sequence takes at most ceil(n / block) blocks plus one copy-on-write copy.
        if kv.rows_free >= sum(rows) + 2 * self.block_size * len(rows):
            return
        victims = self._victims()
        while kv.free_blocks < kv.blocks_needed(seq_ids, rows):
            if not next(victims, False):
                return  # nothing left to evict: the step fails and says why (`_pool_error`)

    def free_one_block(self) -> None:
        """Room for the partial block a prefix fork copies."""
        victims = self._victims()
        while self.kv.free_blocks < 1 and next(victims, False):
            pass

    def _victims(self) -> Iterator[bool]:
        """Evict one cache per step of the iteration (True each time)."""
        for cs in self.worker.idle_with_kv():
            cs.conv.context.release_kv(self.kv, evicted=True)
            self.metrics.add("kv_evictions")
            log.debug("evicted the KV cache of idle conversation %d", cs.conv.conv_id)
            yield True
        for entry in self.worker.prefix_kv.evictable():
            self.worker.prefix_kv.drop(entry)
            self.metrics.add("prefix_evictions")
            log.debug("evicted the cached prefix of voice %s", entry.key)
            yield True
