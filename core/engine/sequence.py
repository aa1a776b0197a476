"""KVSequence: one sequence of the KV pool and the rows it holds.

It is the only record of how many rows a sequence holds (conversation caches and voice prefixes
alike). Rows are committed after a step succeeded; a failed step leaves the pool longer than the
committed rows and `rollback` cuts it back, so one number never needs reconciling with another.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.history import common_prefix_len
from core.model import KVPool


class KVSequence:
    """A pool sequence plus the rows in it, in order (engine thread only)."""

    __slots__ = ("pool", "seq_id", "_rows", "_length")

    def __init__(self, pool: KVPool, seq_id: int, rows: Tensor | None = None) -> None:
        self.pool, self.seq_id = pool, seq_id
        self._rows: list[Tensor] = [] if rows is None else [rows]
        self._length = 0 if rows is None else int(rows.shape[0])

    @classmethod
    def new(cls, pool: KVPool) -> KVSequence:
        return cls(pool, pool.new_sequence())

    @property
    def length(self) -> int:
        return self._length

    def rows(self) -> Tensor | None:
        return torch.cat(self._rows) if self._rows else None

    def head(self, length: int) -> Tensor:
        """The first `length` rows, without concatenating the rest."""
        parts, n = [], 0
        for part in self._rows:
            if n >= length:
                break
            parts.append(part[: length - n])
            n += int(part.shape[0])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def holds(self, target: Tensor, length: int) -> bool:
        """True when the sequence already holds the first `length` rows of `target`."""
        if self._length < length or target.shape[0] < length:
            return False
        return common_prefix_len(self.head(length), target[:length]) == length

    def fork(self, length: int) -> KVSequence:
        """A new sequence sharing this one's first `length` rows (full blocks shared, the
        partial block copied). Raises `KVPoolExhausted` when no block is free for the copy."""
        return KVSequence(self.pool, self.pool.fork(self.seq_id, length), self.head(length))

    def cut_to(self, target: Tensor) -> Tensor:
        """Cut at the first difference with `target`; returns the rows still to prefill."""
        cached = self.rows()
        cached = target[:0] if cached is None else cached
        keep = common_prefix_len(cached, target)
        if keep < self._length:
            self.pool.truncate(self.seq_id, keep)
        self._rows, self._length = [cached[:keep]], keep  # one tensor again (turn boundary)
        return target[keep:]

    def append(self, rows: Tensor) -> None:
        """Commit rows a step wrote."""
        self._rows.append(rows.detach().to("cpu"))
        self._length += int(rows.shape[0])

    def rollback(self) -> None:
        """After a failed step: the pool back to the committed rows."""
        if self.pool.length(self.seq_id) != self._length:
            self.pool.truncate(self.seq_id, self._length)

    def free(self) -> None:
        self.pool.free(self.seq_id)
        self._rows, self._length = [], 0
