"""Worker: the engine thread's state and the life of each turn (admit, start, end, cancel).

Only the engine thread touches it. Each tick it starts queued turns, pulls new text into the
active ones, asks the scheduler for a plan and hands the rows to the `Executor`. Every turn ends
through `end_turn`, which frees its slot, records what the listener heard in the conversation,
and only then lets the consumer see the end.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import Tensor

from core.conversation import Conversation, ConversationContext
from core.engine.config import EngineConfig
from core.engine.executor import Executor, Work
from core.engine.gate import Gate, Job
from core.engine.kv_room import KVBudget, KVRoom
from core.engine.metrics import Metrics
from core.engine.prefix import PrefixEntry, PrefixKVCache
from core.engine.runner import ModelRunner, RowWork
from core.engine.scheduler import plan_step
from core.engine.slots import SlotTable
from core.engine.stream import TurnStatus, TurnStream
from core.engine.turn import TEXT_LEAD, ActiveTurn, Phase, decode_rows
from core.errors import EngineClosed, MossError, StreamCancelled, StreamFailed
from core.model import KVPool
from core.prompt import PromptBuilder

log = logging.getLogger("core.engine")
T = TypeVar("T")
IDLE_S = 1.0  # sleep with no turn at all (every input sets the wake-up event anyway)
STATS_LOG_S = 30.0  # while busy, one INFO line of engine stats this often
RECENT_TURNS = 8  # finished turns per conversation that `cancel(played_s)` can still cut

SPEAK, USER = "speak", "user"
Item = tuple[str, Any]  # (SPEAK, TurnStream) | (USER, Job)


class ConvState:
    """Engine-thread bookkeeping of one conversation (its context lives in `conv.context`)."""

    __slots__ = ("conv", "queue", "active", "finished", "counter", "last_used", "room_wait")

    def __init__(self, conv: Conversation) -> None:
        self.conv = conv
        self.queue: deque[Item] = deque()  # FIFO of its turns: user turns and assistant turns
        self.active: ActiveTurn | None = None
        # Recent finished turns, newest last: a late cancel(played_s) still cuts them (a
        # reply spoken as several turns is heard, and interrupted, after all are generated).
        self.finished: deque[ActiveTurn] = deque(maxlen=RECENT_TURNS)
        self.counter = 0  # frames drawn: the conversation's random stream spans its turns
        self.last_used = 0.0
        # (turn at the head of the queue, since when) while it waits for KV pool room
        self.room_wait: tuple[TurnStream, float] | None = None


class Worker:
    """Turn lifecycle and ticks on the engine thread."""

    def __init__(self, *, config: EngineConfig, gate: Gate, runner: ModelRunner, kv: KVPool,
                 builder: PromptBuilder, tokenizer: Any, sample_rate: int) -> None:
        self.config, self.gate, self.runner, self.kv = config, gate, runner, kv
        self.builder, self.tokenizer, self.sample_rate = builder, tokenizer, sample_rate
        self.metrics = Metrics()
        self.slots = SlotTable(config.max_streams)
        self.convs: dict[int, ConvState] = {}
        self.active: dict[int, ActiveTurn] = {}  # turn id -> turn
        self.prefix_kv = PrefixKVCache(kv, config.prefix_cache_voices)
        self.room = KVRoom(self)
        self.executor = Executor(self)
        self._stats_logged = time.monotonic()

    # -- helpers for the executor -------------------------------------------------------------
    def context(self, turn: ActiveTurn | PrefixEntry) -> ConversationContext | PrefixEntry:
        """KV bookkeeping of a work item's owner (a voice prefix keeps its own)."""
        if isinstance(turn, PrefixEntry):
            return turn
        return self.convs[turn.conv_id].conv.context

    def idle_with_kv(self) -> Iterator[ConvState]:
        """Conversations without a turn that hold a KV cache, least recently used first."""
        idle = [cs for cs in self.convs.values()
                if cs.active is None and cs.conv.context.seq_id is not None]
        return iter(sorted(idle, key=lambda cs: cs.last_used))

    def per_stream(self, turn: ActiveTurn, fn: Callable[[], T]) -> T | None:
        """Run per-stream work; an exception fails only that stream."""
        try:
            return fn()
        except Exception as exc:
            self.fail(turn, exc)
        return None

    def fail(self, turn: ActiveTurn | PrefixEntry, exc: Exception) -> None:
        """End a turn with its error: our own errors as they are, anything else wrapped.

        A voice prefix that fails is dropped; the turns waiting for it prefill it themselves.
        """
        if isinstance(turn, PrefixEntry):
            log.warning("prefill of a voice prefix failed: %r", exc)
            self.prefix_kv.drop(turn)
            return
        if not isinstance(exc, MossError):
            failed = StreamFailed(f"turn {turn.stream.turn_id} failed: {exc!r}")
            failed.__cause__ = exc
            exc = failed
        self.end_turn(turn, exc)

    # -- commands (run in order on the engine thread) -----------------------------------------
    def add_conversation(self, conv: Conversation) -> None:
        ctx = conv.context  # a history the pool cannot hold is trimmed, never refused for ever
        ctx.max_rows = min(ctx.max_rows, self.room.max_context_rows())
        self.convs[conv.conv_id] = ConvState(conv)

    def enqueue(self, conv_id: int, item: Item) -> None:
        cs = self.convs.get(conv_id)
        if cs is None:
            self.reject(item, EngineClosed("this conversation was closed"))
        else:
            cs.queue.append(item)

    def reject(self, item: Item, error: BaseException) -> None:
        kind, payload = item
        if kind == SPEAK:
            self.turn_over(payload, error)
        else:
            payload.fail(error)

    def cancel(self, stream: TurnStream, played_s: float | None) -> None:
        """Cancel an active or queued turn, or truncate a finished one (late interruption)."""
        turn = self.active.get(stream.turn_id)
        if turn is not None:
            self.end_turn(turn, None, cancelled=True, played_s=played_s)
            return
        for cs in self.convs.values():
            if (SPEAK, stream) in cs.queue:
                cs.queue.remove((SPEAK, stream))
                self.metrics.add("turns_cancelled")
                self.turn_over(stream, None)
                return
            done = next((t for t in cs.finished if t.stream is stream), None)
            if done is not None:
                heard = done.heard(played_s)
                ctx = cs.conv.context
                if heard is None:
                    ctx.remove_assistant(stream.turn_id)
                else:
                    ctx.replace_assistant(stream.turn_id, heard.text, heard.text_ids, heard.frames)
                cs.conv._publish()
                return

    def drop_conversation(self, conv_id: int) -> None:
        cs = self.convs.get(conv_id)
        if cs is None:
            return
        for item in cs.queue:
            self.reject(item, StreamCancelled("the conversation was closed"))
        cs.queue.clear()
        if cs.active is not None:
            self.end_turn(cs.active, StreamCancelled("the conversation was closed"))
        del self.convs[conv_id]
        cs.conv.context.release_kv(self.kv)
        cs.finished.clear()

    def shutdown(self, pending: list[Callable[[], None]]) -> None:
        """Engine closing: every waiting stream and job ends with EngineClosed."""
        for command in pending:
            if isinstance(command, Job | Enqueue):
                command.fail(EngineClosed("the engine was closed"))
        for cs in self.convs.values():
            for item in cs.queue:
                self.reject(item, EngineClosed("the engine was closed"))
            cs.queue.clear()
        for turn in list(self.active.values()):
            self.gate.release_turn(turn.stream.turn_id)
            turn.stream._finish(EngineClosed("the engine was closed"))
        self.active.clear()

    # -- ticks ----------------------------------------------------------------------------------
    def tick(self) -> float | None:
        """One scheduler step; returns how long to sleep (None: run again at once)."""
        now = time.monotonic()
        self._admit(now)
        self._resolve_prefix_waits()
        timeout = self.config.text_timeout_s
        for turn in list(self.active.values()):
            self.per_stream(turn, lambda t=turn: t.ingest_text(now))
            if turn.phase is Phase.DONE:
                continue
            if turn.empty_text:
                self.end_turn(turn, None)
            elif timeout is not None and turn.waiting_for_text() and now - turn.text_at > timeout:
                self.fail(turn, TimeoutError(f"no text for {timeout:g} s (push_text/end_text)"))
        cfg = self.config
        demands = [t.demand(sid, now) for sid, t in self.active.items()]
        demands += [entry.demand() for entry in self.prefix_kv.building()]
        plan = plan_step(demands, max_batch=cfg.max_batch, prefill_chunk=cfg.prefill_chunk,
                         lead_s=cfg.lead_s)
        if plan.empty:
            if not self.active and not any(cs.queue for cs in self.convs.values()):
                return IDLE_S
            return cfg.idle_wait_s if plan.wake_in_s is None else min(plan.wake_in_s,
                                                                       cfg.idle_wait_s)
        work: Work = []
        for chunk in plan.prefill:
            self.metrics.add("prefill_rows", chunk.rows)
            if chunk.sid < 0:  # a voice prefix (negative ids never collide with turn ids)
                entry = self.prefix_kv.by_sid(chunk.sid)
                assert entry is not None, "a planned prefix is in the cache"
                rows = entry.take_prefill(chunk.rows)
                work.append((entry, RowWork(entry.seq_id, rows, None)))
                continue
            turn = self.active[chunk.sid]
            rows = turn.take_prefill(chunk.rows)
            slot = turn.lease.index if chunk.samples else None
            work.append((turn, RowWork(self._seq(turn), rows, slot)))
        turns, text_ids = [], []
        for sid in plan.decode:  # text ids taken per stream (a broken turn fails alone) ...
            turn = self.active[sid]
            taken = self.per_stream(turn, lambda t=turn: (t.next_text_id(),))
            if taken is not None:
                turns.append(turn)
                text_ids.append(taken[0])
        if turns:  # ... and the rows built for all of them at once
            for turn, row in zip(turns, decode_rows(self.builder, turns, text_ids), strict=True):
                work.append((turn, RowWork(self._seq(turn), row, turn.lease.index)))
        if work:
            self.executor.run(work)
        if now - self._stats_logged > STATS_LOG_S:
            self._stats_logged = now
            outstanding, convs = self.gate.counts()
            log.info("engine: %s", self.metrics.snapshot(
                active=len(self.active), queued=max(0, outstanding - len(self.active)),
                conversations=convs, kv_rows_free=self.kv.rows_free))
        return None

    def _seq(self, turn: ActiveTurn) -> int:
        seq = self.context(turn).seq_id
        assert seq is not None, "an active turn always has a KV sequence"
        return seq

    # -- turn lifecycle -------------------------------------------------------------------------
    @property
    def _reserve_rows(self) -> int:
        """KV rows a turn may add after its history: lead, frames and the EOS row."""
        return TEXT_LEAD + self.config.max_frames_per_turn + 1

    def _admit(self, now: float) -> None:
        """Start queued turns in order. A turn starts only when the KV pool can hold it to its
        end beside the speaking turns; otherwise it waits (younger turns wait behind it)."""
        budget: KVBudget | None = None
        blocked = False
        for cs in self.room.admission_order():
            while cs.active is None and cs.queue:
                kind, item = cs.queue[0]
                if kind == USER:
                    cs.queue.popleft()
                    item()
                    continue
                if item.status is not TurnStatus.QUEUED:  # cancelled while queued
                    cs.queue.popleft()
                    self.turn_over(item, None)
                    continue
                if budget is None:
                    budget = self.room.budget()
                blocks = None if blocked else self.room.admit(cs, self._reserve_rows, budget)
                if blocks is None:
                    blocked = True
                    if self.room.wait(cs, item, now):
                        continue  # refused: the next item of this conversation may go
                    break
                cs.queue.popleft()
                cs.room_wait = None
                self._start_turn(cs, item, now, blocks)

    def _start_turn(self, cs: ConvState, stream: TurnStream, now: float, kv_blocks: int) -> None:
        lease = self.slots.acquire()
        assert lease is not None, "admission guarantees a slot per speaking conversation"
        turn = ActiveTurn(stream, cs.conv.conv_id, lease, builder=self.builder,
                          tokenizer=self.tokenizer, config=self.config,
                          sample_rate=self.sample_rate, now=now)
        turn.kv_blocks = kv_blocks
        self.active[stream.turn_id] = turn
        cs.active, cs.last_used = turn, now
        self.metrics.add("turns_started")
        reserve = self._reserve_rows

        def prepare() -> None:
            ctx = cs.conv.context
            turn.rebuild = ctx.kv_evicted
            self.metrics.add("kv_rebuilds", int(turn.rebuild))
            target = ctx.begin_assistant(reserve)
            turn.kv_blocks = self.room.blocks(int(target.shape[0]) + reserve)
            n, entry = ctx.prefix_len(), None
            if not ctx.holds_prefix(target, n):  # new, evicted, or a new voice: fork
                key = None if ctx.voice is None else ctx.voice.key
                entry = self.prefix_kv.acquire(key, target[:n], now)
                if entry is not None:  # a fork will replace the cache: free it now, not
                    ctx.release_kv(self.kv)  # once the prefix is ready
            if entry is not None and not entry.ready:
                turn.prefix_wait = (entry.key, target)  # queued once the prefix is in the KV
            else:
                self._sync_kv(turn, target, entry)
            self.runner.start_turn(lease.index, cs.conv.sampling, cs.counter)
            turn.sampler_started = True
            stream._set_active()

        self.per_stream(turn, prepare)

    def _sync_kv(self, turn: ActiveTurn, target: Tensor, prefix: PrefixEntry | None) -> None:
        """Bring the conversation's KV to `target` (forking `prefix` when it helps) and queue
        the rows still missing ahead of the turn's lead."""
        ctx = self.convs[turn.conv_id].conv.context
        before = ctx.seq_id
        if prefix is not None and prefix.rows.shape[0] % self.kv.block_size:
            self.room.free_one_block()  # the fork copies the prefix's partial block
        turn.queue_rows(ctx.sync_kv(self.kv, target, prefix), front=True)
        if prefix is not None and ctx.seq_id != before and ctx.kv_len > 0:
            self.metrics.add("prefix_forks")

    def _resolve_prefix_waits(self) -> None:
        """Turns waiting for a voice prefix go on once it is ready (or gone: then they prefill
        it themselves, so a failed or evicted prefix never blocks a turn)."""
        for turn in list(self.active.values()):
            if turn.prefix_wait is None or turn.phase is Phase.DONE:
                continue
            key, target = turn.prefix_wait
            entry = self.prefix_kv.get(key)  # type: ignore[arg-type]
            if entry is not None and entry.stalled:
                self.prefix_kv.drop(entry)
                entry = None
            if entry is None or entry.ready:
                turn.prefix_wait = None
                self.per_stream(turn, lambda t=turn, r=target, e=entry: self._sync_kv(t, r, e))

    def end_turn(self, turn: ActiveTurn, error: BaseException | None, *,
                 cancelled: bool = False, played_s: float | None = None) -> None:
        """Stop a turn (normal end, cancel or failure): free its slot, record what was heard."""
        if turn.phase is Phase.DONE:
            return
        turn.phase = Phase.DONE
        self.active.pop(turn.stream.turn_id, None)
        cs = self.convs.get(turn.conv_id)
        try:
            if self.slots.valid(turn.lease):
                if cs is not None and turn.sampler_started:
                    cs.counter = self.runner.counter(turn.lease.index)
                self.slots.release(turn.lease)
            if cs is not None:
                cs.active, cs.last_used = None, time.monotonic()
                self._keep_heard(cs, turn, error, played_s)
                cs.conv._publish()  # also after a failure: the turn may have trimmed old turns
        finally:  # whatever went wrong above, the consumer sees the end of its turn
            name = "turns_cancelled" if cancelled else "turns_failed" if error else "turns_finished"
            self.metrics.add(name)
            log.debug("turn %d ended (%s): %d frames, ttfa %s", turn.stream.turn_id, name,
                      len(turn.frames), turn.stream.ttfa_s)
            if error is not None:
                log.info("turn %d failed: %r", turn.stream.turn_id, error)
            self.turn_over(turn.stream, None if cancelled else error)

    def _keep_heard(self, cs: ConvState, turn: ActiveTurn, error: BaseException | None,
                    played_s: float | None) -> None:
        """Record the turn as heard. A failed turn keeps the audio it delivered (the listener
        heard it, as after a cancel) and stays cuttable by a later `cancel(played_s)`."""
        try:
            heard = turn.heard(played_s)
            if heard is not None:
                cs.conv.context.add_assistant(turn.stream.turn_id, heard.text, heard.text_ids,
                                              heard.frames)
        except Exception:
            if error is None:
                raise  # the turn fails with it
            log.exception("turn %d: its delivered audio is not kept", turn.stream.turn_id)
            return
        if error is None or heard is not None:
            cs.finished.append(turn)

    def turn_over(self, stream: TurnStream, error: BaseException | None) -> None:
        """Release admission before the consumer can see the end (its next speak() fits)."""
        self.gate.release_turn(stream.turn_id)
        stream._finish(error)


class Enqueue:
    """Command: put a user turn into its conversation's FIFO (behind turns already queued)."""

    def __init__(self, worker: Worker, conv_id: int, job: Job) -> None:
        self.worker, self.conv_id, self.job = worker, conv_id, job

    def __call__(self) -> None:
        self.worker.enqueue(self.conv_id, (USER, self.job))

    def fail(self, error: BaseException) -> None:
        self.job.fail(error)
