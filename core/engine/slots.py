"""Fixed slot table: per-stream device state (codec ring caches, sampler history) lives in slots.

Slots are allocated once for `max_streams`; a new turn takes a free slot and resets it, a finished
turn releases it. Nothing is reallocated in the hot loop. Each acquisition gets a fresh generation
number, so a late result for a slot that was reused is recognised and dropped (stream-id guard).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SlotLease:
    """A slot held by one turn; `generation` distinguishes successive holders of a slot."""

    index: int
    generation: int


class SlotTable:
    """Free list over `capacity` slots with generation guards (engine thread only)."""

    def __init__(self, capacity: int) -> None:
        assert capacity > 0, "slot table needs at least one slot"
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self._generation = [0] * capacity
        self._held = [False] * capacity

    def acquire(self) -> SlotLease | None:
        """Take a free slot (None when all are held)."""
        if not self._free:
            return None
        index = self._free.pop()
        self._generation[index] += 1
        self._held[index] = True
        return SlotLease(index, self._generation[index])

    def release(self, lease: SlotLease) -> None:
        """Give a slot back; releasing a stale or already released lease is a bug."""
        assert self.valid(lease), f"release of stale slot lease {lease}"
        self._held[lease.index] = False
        self._free.append(lease.index)

    def valid(self, lease: SlotLease) -> bool:
        """True while `lease` is the current holder of its slot."""
        return self._held[lease.index] and self._generation[lease.index] == lease.generation
