"""One tick's execution: rows -> `ModelRunner` -> frames and chunks delivered to the streams.

A batched step that raises is rolled back (KV lengths, sampler and codec slot state) and each
stream is retried alone, so one bad stream fails by itself and the others lose nothing.

`KVRoom` keeps the KV pool able to serve every speaking turn to its end: a turn starts only
when the pool can hold its whole turn beside the turns already speaking (`admit`), and before
each step idle conversations' caches and ready voice prefixes are evicted, least recently used
first, until the step's blocks are free (`make_room`). Evicted caches are rebuilt from the
conversations' rows at their next turn, so pool pressure costs time, never a running turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from core.engine.prefix import PrefixEntry
from core.engine.runner import FrameAudio, RowWork, StepOutput
from core.engine.turn import ActiveTurn, Phase
from core.errors import CapacityError
from core.model.kv_cache import KVPoolExhausted

if TYPE_CHECKING:
    from core.engine.stream import TurnStream
    from core.engine.worker import ConvState, Worker

log = logging.getLogger("core.engine")

Work = list[tuple[ActiveTurn | PrefixEntry, RowWork]]  # a turn's rows, or a voice prefix's
# Blocks a turn may take beyond ceil(rows / block size): one copy-on-write copy of a shared
# partial block (after a cut inside a shared prefix) and the partial block of the voice prefix
# it forks (kept by the prefix cache beside the turn's own copy).
KV_MARGIN_BLOCKS = 2


class Executor:
    """Runs planned work for the `Worker` (engine thread only)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.runner, self.kv, self.metrics = worker.runner, worker.kv, worker.metrics
        # Test hook: called with (turn id, raw logits [16, V]) for every sampled frame.
        self.trace_logits: Callable[[int, torch.Tensor], None] | None = None

    def run(self, work: Work) -> None:
        """Run a tick; if the batch fails, roll back and run each stream alone to isolate it."""
        self.worker.room.make_room([w.seq_id for _, w in work],
                                   [int(w.rows.shape[0]) for _, w in work])
        started = time.monotonic()
        out = self._try(work)
        frames = 0
        if out is not None:
            self._apply(work, out)
            frames = int(out.codes.shape[0])
        elif len(work) > 1:
            log.warning("batched step failed; retrying its %d streams one by one", len(work))
            for item in work:
                if item[0].phase is not Phase.DONE and (single := self._try([item])) is not None:
                    self._apply([item], single)
                    frames += int(single.codes.shape[0])
        self.metrics.record_step(time.monotonic() - started, frames)

    def _try(self, work: Work) -> StepOutput | None:
        ctxs = [self.worker.context(t) for t, _ in work]
        lengths = [c.kv_len for c in ctxs]
        slots = [w.slot for _, w in work if w.slot is not None]
        snap = self.runner.snapshot(slots) if slots else None
        try:
            return self.runner.step([w for _, w in work],
                                    want_logits=self.trace_logits is not None)
        except Exception as exc:
            for ctx, n in zip(ctxs, lengths, strict=True):
                if ctx.seq_id is not None and self.kv.length(ctx.seq_id) != n:
                    ctx.kv_truncate(self.kv, n)
            if snap is not None:
                self.runner.restore(snap)
            if len(work) == 1:
                self.worker.fail(work[0][0], _pool_error(exc))
            return None

    def _apply(self, work: Work, out: StepOutput) -> None:
        now = time.monotonic()
        codes = out.codes.unbind(0)  # one view per sampled item, in one call
        j = 0
        for turn, w in work:
            self.worker.context(turn).kv_appended(w.rows)
            if isinstance(turn, PrefixEntry) and turn.ready:
                self.metrics.add("prefix_prefills")
            if w.slot is None:
                continue
            assert isinstance(turn, ActiveTurn), "only turns sample frames"
            frame, audio = codes[j], out.audio[j]
            if out.logits is not None and self.trace_logits is not None:
                self.trace_logits(turn.stream.turn_id, out.logits[j])
            j += 1
            if turn.phase is not Phase.DONE:
                self.worker.per_stream(
                    turn, lambda t=turn, c=frame, a=audio: self._deliver(t, c, a, now))

    def _deliver(self, turn: ActiveTurn, codes: torch.Tensor, audio: FrameAudio | None,
                 now: float) -> None:
        alive = turn.accept_frame(codes, audio)
        chunk = turn.take_chunk(now, final=not alive)
        if chunk is not None:
            if chunk.start_s == 0.0 and turn.lead_ready_at is not None:
                turn.stream.ttfa_s = now - turn.lead_ready_at
                self.metrics.record_ttfa(turn.stream.ttfa_s, rebuild=turn.rebuild)
            turn.stream.frames = len(turn.frames)
            turn.stream._put(chunk)
        if turn.underruns:
            self.metrics.add("underruns", turn.underruns)
            turn.underruns = 0
        if not alive:
            self.worker.end_turn(turn, None)


@dataclass(slots=True)
class KVBudget:
    """Pool blocks promised at admission: held now or still to be taken by speaking turns."""

    committed: int
    held: set[int]  # blocks held by speaking turns and prefixes being prefilled


def _pool_error(exc: Exception) -> Exception:
    """A full pool at run time would be an accounting bug (admission keeps room for every
    speaking turn): say so with the retryable error, never as the conversation's overflow."""
    if isinstance(exc, KVPoolExhausted):
        log.error("KV pool exhausted during a step (admission should have kept room): %s", exc)
        err = CapacityError(f"KV pool exhausted while the turn was speaking: {exc}")
        err.__cause__ = exc
        return err
    return exc


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
