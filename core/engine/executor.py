"""One tick's execution: rows -> `ModelRunner` -> frames and chunks delivered to the streams.

A batched step that raises is rolled back (KV lengths, sampler and codec slot state) and each
stream is retried alone, so one bad stream fails by itself and the others lose nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from core.engine.prefix import PrefixEntry
from core.engine.runner import FrameAudio, RowWork, StepOutput
from core.engine.turn import ActiveTurn, Phase
from core.errors import CapacityError
from core.model.kv_cache import KVPoolExhausted

if TYPE_CHECKING:
    from core.engine.worker import Worker

log = logging.getLogger("core.engine")

Work = list[tuple[ActiveTurn | PrefixEntry, RowWork]]  # a turn's rows, or a voice prefix's


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


def _pool_error(exc: Exception) -> Exception:
    """A full pool at run time would be an accounting bug (admission keeps room for every
    speaking turn): say so with the retryable error, never as the conversation's overflow."""
    if isinstance(exc, KVPoolExhausted):
        log.error("KV pool exhausted during a step (admission should have kept room): %s", exc)
        err = CapacityError(f"KV pool exhausted while the turn was speaking: {exc}")
        err.__cause__ = exc
        return err
    return exc
