"""Prefix KV cache: the system+voice prefix of each voice prefilled once per engine.

Every conversation's context starts with the same rows for a given voice (system block, then
the voice block). Instead of prefilling them for each new conversation (or each rebuild after an
eviction or a voice change), the engine keeps one pool sequence per voice holding exactly those
rows, and a conversation forks it (`KVPool.fork`: full blocks shared, copy-on-write). The prefill
of a new voice's prefix is ordinary engine work: it is scheduled in chunks like a turn's prompt,
and the turns that need it wait (without holding up other streams) until it is ready.

The cache is bounded (LRU over voices) and its entries are evicted like idle conversations when
the pool runs low; an evicted or failed entry only costs a later prefill, never correctness.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from torch import Tensor

from core.engine.scheduler import StreamDemand
from core.engine.turn import Phase
from core.model import KVPool

PrefixKey = str | None  # the voice's content hash; None: no voice (system block only)


class PrefixEntry:
    """One voice's prefix sequence in the pool, being prefilled or ready to fork.

    It also plays the part of a conversation context for the executor (`seq_id`, `kv_len`,
    `kv_appended`, `kv_truncate`), so its prefill chunks run through the same rollback path.
    """

    __slots__ = ("uid", "key", "rows", "seq_id", "kv_len", "pending", "phase", "created",
                 "last_used")

    def __init__(self, uid: int, key: PrefixKey, rows: Tensor, seq_id: int, now: float) -> None:
        self.uid, self.key, self.rows, self.seq_id = uid, key, rows, seq_id
        self.kv_len = 0
        self.pending: Tensor | None = rows  # rows not yet handed to the scheduler
        self.phase = Phase.PREFILL  # DONE once dropped (the executor skips dropped owners)
        self.created = self.last_used = now

    @property
    def sid(self) -> int:
        """Scheduler id: negative, so it never collides with a turn id."""
        return -self.uid

    @property
    def ready(self) -> bool:
        return self.phase is not Phase.DONE and self.kv_len == int(self.rows.shape[0])

    def demand(self) -> StreamDemand:
        rows = 0 if self.pending is None else int(self.pending.shape[0])
        return StreamDemand(self.sid, prefill_rows=rows, arrival=self.created)

    def take_prefill(self, n: int) -> Tensor:
        assert self.pending is not None and 0 < n <= self.pending.shape[0]
        rows, rest = self.pending[:n], self.pending[n:]
        self.pending = rest if rest.shape[0] else None
        return rows

    def kv_appended(self, rows: Tensor) -> None:
        self.kv_len += int(rows.shape[0])

    def kv_truncate(self, pool: KVPool, length: int) -> None:
        """Roll back a failed batch (the executor retries the chunk alone, or drops us)."""
        assert 0 <= length <= self.kv_len, "bad KV rollback"
        pool.truncate(self.seq_id, length)
        self.kv_len = length

    @property
    def stalled(self) -> bool:
        """Nothing left to schedule, yet not complete (a chunk was lost): drop and rebuild."""
        return self.pending is None and not self.ready


class PrefixKVCache:
    """LRU of voice prefixes in the KV pool (engine thread only)."""

    def __init__(self, pool: KVPool, capacity: int) -> None:
        self.pool, self.capacity = pool, capacity
        self._entries: OrderedDict[PrefixKey, PrefixEntry] = OrderedDict()
        self._next_uid = 0
        self.builds = 0  # prefixes prefilled (metrics, tests)

    def __len__(self) -> int:
        return len(self._entries)

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
            self._next_uid += 1
            entry = PrefixEntry(self._next_uid, key, rows, self.pool.new_sequence(), now)
            self._entries[key] = entry
            self.builds += 1
        self._entries.move_to_end(key)
        entry.last_used = now
        return entry

    def building(self) -> list[PrefixEntry]:
        """Entries with rows still to prefill."""
        return [e for e in self._entries.values() if e.pending is not None]

    def unready(self) -> list[PrefixEntry]:
        """Entries still being prefilled: their blocks cannot be evicted yet."""
        return [e for e in self._entries.values() if not e.ready]

    def by_sid(self, sid: int) -> PrefixEntry | None:
        for entry in self._entries.values():
            if entry.sid == sid:
                return entry
        return None

    def evictable(self) -> Iterator[PrefixEntry]:
        """Ready entries, least recently used first (a copy: callers drop while iterating)."""
        return iter([e for e in self._entries.values() if e.ready])

    def drop(self, entry: PrefixEntry) -> None:
        """Forget an entry and give its blocks back (forks keep the blocks they share)."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if entry.phase is not Phase.DONE:
            entry.phase = Phase.DONE
            self.pool.free(entry.seq_id)
