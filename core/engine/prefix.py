"""Prefix KV cache: the system+voice prefix of each voice prefilled once per engine.

Every conversation's history starts with the same rows for a given voice (system block, then
the voice block). Instead of prefilling them for each new conversation (or each rebuild after an
eviction or a voice change), the engine keeps one pool sequence per voice holding exactly those
rows, and a conversation forks it (`KVSequence.fork`: full blocks shared, copy-on-write). The
prefill of a new voice's prefix is ordinary engine work: it is scheduled in chunks like a turn's
prompt, and the turns that need it wait (without holding up other streams) until it is ready.

The cache is bounded (LRU over voices) and its entries are evicted like idle conversations'
caches when the pool runs low; an evicted or failed entry only costs a later prefill.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor

from core.engine.scheduler import StreamDemand
from core.engine.sequence import KVSequence
from core.model import KVPool

PrefixKey = str | None  # the voice's content hash; None: no voice (system block only)


class PrefixEntry:
    """One voice's prefix: its rows, and the pool sequence being prefilled with them."""

    __slots__ = ("key", "rows", "seq", "pending", "dropped", "created", "last_used")

    def __init__(self, key: PrefixKey, rows: Tensor, seq: KVSequence, now: float) -> None:
        self.key, self.rows, self.seq = key, rows, seq
        self.pending: Tensor | None = rows  # rows not yet handed to a step
        self.dropped = False
        self.created = self.last_used = now

    @property
    def ready(self) -> bool:
        return not self.dropped and self.seq.length == int(self.rows.shape[0])

    @property
    def stalled(self) -> bool:
        """Nothing left to schedule, yet not complete (a chunk was lost): drop and rebuild."""
        return self.pending is None and not self.ready

    def demand(self, sid: int, now: float) -> StreamDemand:
        rows = 0 if self.pending is None else int(self.pending.shape[0])
        return StreamDemand(sid, prefill_rows=rows, arrival=self.created)

    def take_prefill(self, n: int) -> Tensor:
        assert self.pending is not None and 0 < n <= self.pending.shape[0]
        rows, rest = self.pending[:n], self.pending[n:]
        self.pending = rest if rest.shape[0] else None
        return rows


class PrefixKVCache:
    """LRU of voice prefixes in the KV pool (engine thread only)."""

    def __init__(self, pool: KVPool, capacity: int) -> None:
        self.pool, self.capacity = pool, capacity
        self._entries: OrderedDict[PrefixKey, PrefixEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[PrefixEntry]:
        return list(self._entries.values())

    def get(self, key: PrefixKey) -> PrefixEntry | None:
        return self._entries.get(key)

    def acquire(self, key: PrefixKey, rows: Tensor, now: float) -> PrefixEntry | None:
        """The entry for `key` (marked recently used), started now if missing; None when the
        cache is disabled (capacity 0)."""
        if self.capacity <= 0:
            return None
        entry = self._entries.get(key)
        if entry is not None and not entry.rows.equal(rows):  # same key, other rows: rebuild
            self.drop(entry)
            entry = None
        if entry is None:
            while len(self._entries) >= self.capacity:
                self.drop(next(iter(self._entries.values())))
            entry = PrefixEntry(key, rows, KVSequence.new(self.pool), now)
            self._entries[key] = entry
        self._entries.move_to_end(key)
        entry.last_used = now
        return entry

    def building(self) -> list[PrefixEntry]:
        """Entries with rows still to prefill."""
        return [e for e in self._entries.values() if e.pending is not None]

    def unready(self) -> list[PrefixEntry]:
        """Entries still being prefilled: their blocks cannot be evicted yet."""
        return [e for e in self._entries.values() if not e.ready]

    def evictable(self) -> list[PrefixEntry]:
        """Ready entries, least recently used first (a copy: callers drop while iterating)."""
        return [e for e in self._entries.values() if e.ready]

    def drop(self, entry: PrefixEntry) -> None:
        """Forget an entry and give its blocks back (forks keep the blocks they share)."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if not entry.dropped:
            entry.dropped = True
            entry.seq.free()
