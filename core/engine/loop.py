"""EngineLoop: the engine thread. It owns every engine-side fact and runs one loop:

    commands -> admit -> schedule -> run -> postprocess

*schedule* asks the pure policy (`scheduler.plan_step`) which streams advance and gathers their
rows; *run* is one `ModelRunner.step` (tensors only) for all of them; *postprocess* commits the
rows to their KV sequences, turns frames into chunks and ends finished turns. Nothing below this
module calls back into it. A fault while serving one stream fails that stream: a batched step
that raises is rolled back (KV sequences, sampler and codec slots) and each stream retried alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor

from core.engine.commands import (
    AddUserTurn,
    CloseConversation,
    Command,
    MarkPlayed,
    OpenConversation,
    PendingUser,
    Speak,
    StopTurn,
)
from core.engine.config import EngineConfig
from core.engine.conv_state import ConvState
from core.engine.inbox import Inbox
from core.engine.kv_room import KVBudget, KVRoom
from core.engine.metrics import EngineStats, Metrics
from core.engine.prefix import PrefixEntry, PrefixKVCache
from core.engine.runner import FrameAudio, ModelRunner, RowWork, StepOutput
from core.engine.scheduler import plan_step
from core.engine.sequence import KVSequence
from core.engine.slots import SlotTable
from core.engine.stream import TurnStatus, TurnStream
from core.engine.turn import TurnState, decode_rows
from core.errors import CapacityError, EngineClosed, MossError, StreamCancelled, StreamFailed
from core.model import KVPool
from core.model.kv_cache import KVPoolExhausted
from core.prompt import DELAY, PromptBuilder

log = logging.getLogger("core.engine")
T = TypeVar("T")
IDLE_S = 1.0  # sleep with no turn at all (every input sets the wake-up event anyway)
STATS_LOG_S = 30.0  # while busy, one INFO line of engine stats this often


@dataclass(slots=True)
class Work:
    """One owner's rows in this tick: a turn's (its conversation's cache) or a voice prefix's."""

    owner: TurnState | PrefixEntry
    seq: KVSequence
    rows: RowWork


class EngineLoop:
    """Every engine-side fact and the tick that advances them (engine thread only)."""

    def __init__(self, *, config: EngineConfig, inbox: Inbox, runner: ModelRunner, kv: KVPool,
                 builder: PromptBuilder, tokenizer: Any, sample_rate: int) -> None:
        self.config, self.inbox, self.runner, self.kv = config, inbox, runner, kv
        self.builder, self.tokenizer, self.sample_rate = builder, tokenizer, sample_rate
        self.metrics = Metrics()
        self.slots = SlotTable(config.max_streams)
        self.convs: dict[int, ConvState] = {}
        self.active: dict[int, TurnState] = {}  # turn id -> turn
        self.prefixes = PrefixKVCache(kv, config.prefix_cache_voices)
        self.room = KVRoom(kv, self.prefixes, self.metrics, wait_s=config.kv_wait_s)
        # Test hook: called with (turn id, raw logits [16, V]) for every sampled frame.
        self.trace_logits: Callable[[int, Tensor], None] | None = None
        self._stats_logged = time.monotonic()

    # -- the thread -----------------------------------------------------------------------------
    def run_forever(self) -> None:
        try:
            while self._run_commands():
                timeout = self._guard(self.tick)
                if timeout is not None:
                    self.inbox.wait(timeout)
        finally:
            self._shutdown(self.inbox.take()[0])

    def _run_commands(self) -> bool:
        """Run the queued commands; False once the engine is closing. Its own frame, so the
        last command (after a close, a conversation's whole history) is released here."""
        commands, closing = self.inbox.take()
        for command in commands:
            self._guard(lambda c=command: self.handle(c))
        return not closing

    def _guard(self, fn: Callable[[], T]) -> T | float:
        """Run engine-thread work; an unexpected error is logged, never kills the thread."""
        try:
            return fn()
        except Exception:  # a bug: keep serving, but make it loud
            log.exception("engine thread error")
            return self.config.idle_wait_s

    def stats(self, outstanding: int, conversations: int) -> EngineStats:
        active = len(self.active)
        return self.metrics.snapshot(active=active, queued=max(0, outstanding - active),
                                     conversations=conversations, kv_rows_free=self.kv.rows_free)

    # -- commands -------------------------------------------------------------------------------
    def handle(self, command: Command) -> None:
        match command:
            case OpenConversation(conv_id, history, sampling, view):
                # a history the pool cannot hold is trimmed, never refused for ever
                history.max_rows = min(history.max_rows, self.room.max_context_rows())
                self.convs[conv_id] = ConvState(conv_id, history, sampling, view,
                                                cuttable_turns=self.config.cuttable_turns)
            case Speak() | AddUserTurn():
                cs = self.convs.get(command.conv_id)
                if cs is None:
                    self._reject(command, EngineClosed("this conversation was closed"))
                else:
                    cs.queue.append(command)
            case StopTurn(stream, played_s):
                self._stop(stream, played_s)
            case MarkPlayed(stream, played_s):
                self._mark_played(stream, played_s)
            case CloseConversation(conv_id):
                self._close_conversation(conv_id)

    def _stop(self, stream: TurnStream, played_s: float | None) -> None:
        turn = self.active.get(stream.turn_id)
        if turn is not None:
            if played_s is not None:
                turn.played_s = played_s
            self._end_turn(turn, None, cancelled=True)
            return
        for cs in self.convs.values():
            queued = next((c for c in cs.queue if isinstance(c, Speak) and c.stream is stream),
                          None)
            if queued is not None:
                cs.queue.remove(queued)
                self.metrics.add("turns_cancelled")
                self._turn_over(stream, None, released=True)
                return
        if played_s is not None:
            self._mark_played(stream, played_s)

    def _mark_played(self, stream: TurnStream, played_s: float) -> None:
        """Record what was heard: at the end of a running turn, now for a finished one."""
        turn = self.active.get(stream.turn_id)
        if turn is not None:
            turn.played_s = played_s
            return
        for cs in self.convs.values():
            done = next((t for t in cs.finished if t.stream is stream), None)
            if done is not None:
                heard = done.heard(played_s)
                if heard is None:
                    cs.history.remove_assistant(stream.turn_id)
                else:
                    cs.history.replace_assistant(stream.turn_id, heard.text,
                                                 heard.text_ids or [], heard.codes)
                cs.publish()
                return

    def _close_conversation(self, conv_id: int) -> None:
        cs = self.convs.pop(conv_id, None)
        if cs is None:
            return
        for command in cs.queue:
            self._reject(command, StreamCancelled("the conversation was closed"))
        cs.queue.clear()
        if cs.active is not None:
            self._end_turn(cs.active, StreamCancelled("the conversation was closed"))
        cs.release_kv()
        cs.finished.clear()

    def _reject(self, command: Speak | AddUserTurn, error: BaseException) -> None:
        if isinstance(command, Speak):
            self._turn_over(command.stream, error)
        else:
            command.reply.resolve(error=error)

    def _shutdown(self, pending: list[Command]) -> None:
        """Engine closing: every waiting stream and reply ends with EngineClosed."""
        closed = EngineClosed("the engine was closed")
        for command in pending:
            if isinstance(command, Speak | AddUserTurn):
                self._reject(command, closed)
        for cs in self.convs.values():
            for command in cs.queue:
                self._reject(command, closed)
            cs.queue.clear()
        for turn in list(self.active.values()):
            self.inbox.release_turn(turn.stream.turn_id)
            turn.stream._finish(closed)
        self.active.clear()

    # -- the tick -------------------------------------------------------------------------------
    def tick(self) -> float | None:
        """One step for every runnable stream; returns how long to sleep (None: run again)."""
        now = time.monotonic()
        self._admit(now)
        self._resolve_prefix_waits()
        self._take_text(now)
        work, wake_in_s = self._schedule(now)
        if not work:
            if not self.active and not any(cs.queue for cs in self.convs.values()):
                return IDLE_S
            idle = self.config.idle_wait_s
            return idle if wake_in_s is None else min(wake_in_s, idle)
        self._run(work)
        if now - self._stats_logged > STATS_LOG_S:
            self._stats_logged = now
            log.info("engine: %s", self.stats(*self.inbox.counts()))
        return None

    def _take_text(self, now: float) -> None:
        timeout = self.config.text_timeout_s
        for turn in list(self.active.values()):
            self._per_stream(turn, lambda t=turn: t.ingest_text(now))
            if turn.done:
                continue
            if turn.empty_text:
                self._end_turn(turn, None)
            elif timeout is not None and turn.waiting_for_text() and now - turn.text_at > timeout:
                self._fail(turn, TimeoutError(f"no text for {timeout:g} s (push_text/end_text)"))

    def _schedule(self, now: float) -> tuple[list[Work], float | None]:
        """Pure policy picks the streams; their rows are gathered here (schedule ids are
        positions in `owners`, so prefixes and turns never share an id space by accident)."""
        owners: list[TurnState | PrefixEntry] = [*self.prefixes.building(), *self.active.values()]
        demands = [owner.demand(sid, now) for sid, owner in enumerate(owners)]
        cfg = self.config
        plan = plan_step(demands, max_batch=cfg.max_batch, prefill_chunk=cfg.prefill_chunk,
                         lead_s=cfg.lead_s)
        work: list[Work] = []
        for chunk in plan.prefill:
            self.metrics.add("prefill_rows", chunk.rows)
            owner = owners[chunk.sid]
            rows = owner.take_prefill(chunk.rows)
            if isinstance(owner, PrefixEntry):
                work.append(Work(owner, owner.seq, RowWork(owner.seq.seq_id, rows, None)))
            else:
                seq = self._seq(owner)
                slot = owner.lease.index if chunk.samples else None
                work.append(Work(owner, seq, RowWork(seq.seq_id, rows, slot)))
        turns: list[TurnState] = []
        text_ids: list[int | None] = []
        for sid in plan.decode:  # text ids taken per stream (a broken turn fails alone) ...
            turn = owners[sid]
            assert isinstance(turn, TurnState)
            taken = self._per_stream(turn, lambda t=turn: (t.next_text_id(),))
            if taken is not None:
                turns.append(turn)
                text_ids.append(taken[0])
        if turns:  # ... and the rows built for all of them at once
            for turn, row in zip(turns, decode_rows(self.builder, turns, text_ids), strict=True):
                seq = self._seq(turn)
                work.append(Work(turn, seq, RowWork(seq.seq_id, row, turn.lease.index)))
        return work, plan.wake_in_s

    def _seq(self, turn: TurnState) -> KVSequence:
        seq = self.convs[turn.conv_id].kv
        assert seq is not None, "a started turn always has a KV sequence"
        return seq

    def _run(self, work: list[Work]) -> None:
        """Run a tick; if the batch fails, roll back and run each stream alone to isolate it."""
        self.room.make_room([w.seq.seq_id for w in work], [int(w.rows.rows.shape[0]) for w in work],
                            self._idle_with_kv)
        started = time.monotonic()
        out = self._try(work)
        frames = 0
        if out is not None:
            self._postprocess(work, out)
            frames = int(out.codes.shape[0])
        elif len(work) > 1:
            log.warning("batched step failed; retrying its %d streams one by one", len(work))
            for item in work:
                if not _gone(item.owner) and (single := self._try([item])) is not None:
                    self._postprocess([item], single)
                    frames += int(single.codes.shape[0])
        self.metrics.record_step(time.monotonic() - started, frames)

    def _try(self, work: list[Work]) -> StepOutput | None:
        slots = [w.rows.slot for w in work if w.rows.slot is not None]
        snap = self.runner.snapshot(slots) if slots else None
        try:
            return self.runner.step([w.rows for w in work],
                                    want_logits=self.trace_logits is not None)
        except Exception as exc:
            for w in work:
                w.seq.rollback()
            if snap is not None:
                self.runner.restore(snap)
            if len(work) == 1:
                self._fail(work[0].owner, _pool_error(exc))
            return None

    def _postprocess(self, work: list[Work], out: StepOutput) -> None:
        """Commit the rows, deliver each sampled frame to its turn, end the turns that ended."""
        now = time.monotonic()
        codes = out.codes.unbind(0)  # one view per sampled item, in one call
        j = 0
        for w in work:
            w.seq.append(w.rows.rows)
            if isinstance(w.owner, PrefixEntry):
                if w.owner.ready:
                    self.metrics.add("prefix_prefills")
                continue
            if w.rows.slot is None:
                continue
            turn, frame, audio = w.owner, codes[j], out.audio[j]
            if out.logits is not None and self.trace_logits is not None:
                self.trace_logits(turn.stream.turn_id, out.logits[j])
            j += 1
            if not turn.done:
                self._per_stream(turn, lambda t=turn, c=frame, a=audio: self._deliver(t, c, a, now))

    def _deliver(self, turn: TurnState, codes: Tensor, audio: FrameAudio | None,
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
            self._end_turn(turn, None)

    def _idle_with_kv(self) -> list[ConvState]:
        """Conversations without a turn that hold a KV cache, least recently used first."""
        idle = [cs for cs in self.convs.values() if cs.active is None and cs.kv is not None]
        return sorted(idle, key=lambda cs: cs.last_used)

    # -- starting turns -------------------------------------------------------------------------
    @property
    def _reserve_rows(self) -> int:
        """KV rows a turn may add after its history: lead, frames and the EOS row."""
        return DELAY + self.config.max_frames_per_turn + 1

    def _admit(self, now: float) -> None:
        """Run each conversation's queue in order. A turn starts only when the KV pool can hold
        it to its end beside the speaking turns; otherwise it waits (younger turns behind it)."""
        budget: KVBudget | None = None
        blocked = False
        for cs in self.room.admission_order(list(self.convs.values())):
            while cs.active is None and cs.queue:
                head = cs.queue[0]
                if not head.ready:  # user speech still being encoded
                    break
                if isinstance(head, AddUserTurn):
                    cs.queue.popleft()
                    self._add_user_turn(cs, head)
                    continue
                if head.stream.status is not TurnStatus.QUEUED:  # stopped while queued
                    cs.queue.popleft()
                    self._turn_over(head.stream, None, released=True)
                    continue
                if not head.applied and not self._apply_request(cs, head):
                    cs.queue.popleft()
                    continue
                if budget is None:
                    budget = self.room.budget(
                        [(self.convs[t.conv_id].kv, t.kv_blocks) for t in self.active.values()])
                blocks = None if blocked else self.room.admit(cs, self._reserve_rows, budget)
                if blocks is None:
                    blocked = True
                    refused = self.room.wait(cs, now)
                    if refused is not None:
                        cs.queue.popleft()
                        self._turn_over(head.stream, refused)
                        continue  # the next request of this conversation may go
                    break
                cs.queue.popleft()
                cs.room_wait = None
                self._start_turn(cs, head.stream, now, blocks)

    def _add_user_turn(self, cs: ConvState, command: AddUserTurn) -> None:
        try:
            _add_users(cs, (command.user,), skip_empty=False)
        except Exception as exc:
            command.reply.resolve(error=exc)
        else:
            cs.publish()
            command.reply.resolve()

    def _apply_request(self, cs: ConvState, command: Speak) -> bool:
        """The request's user turns, voice and sampling go into the conversation (once, when it
        reaches the head of the queue); False when a user turn could not be used."""
        command.applied = True
        try:
            _add_users(cs, command.users, skip_empty=True)
        except Exception as exc:
            self._turn_over(command.stream, exc if isinstance(exc, MossError | ValueError)
                            else _wrap(command.stream, exc))
            return False
        cs.history.voice, cs.sampling = command.voice, command.sampling
        if command.users:
            cs.publish()
        return True

    def _start_turn(self, cs: ConvState, stream: TurnStream, now: float, kv_blocks: int) -> None:
        lease = self.slots.acquire()
        assert lease is not None, "admission guarantees a slot per speaking conversation"
        turn = TurnState(stream, cs.conv_id, lease, builder=self.builder, tokenizer=self.tokenizer,
                         config=self.config, sample_rate=self.sample_rate, now=now)
        turn.kv_blocks = kv_blocks
        self.active[stream.turn_id] = turn
        cs.active, cs.last_used = turn, now
        self.metrics.add("turns_started")
        reserve = self._reserve_rows

        def prepare() -> None:
            turn.rebuild = cs.kv_evicted
            self.metrics.add("kv_rebuilds", int(turn.rebuild))
            target = cs.history.begin_assistant(reserve)
            turn.kv_blocks = self.room.blocks(int(target.shape[0]) + reserve)
            n, entry = cs.history.prefix_len(), None
            if cs.kv is None or not cs.kv.holds(target, n):  # new, evicted, or a new voice
                voice = cs.history.voice
                entry = self.prefixes.acquire(None if voice is None else voice.key, target[:n], now)
                if entry is not None:  # a fork will replace the cache: free it now, not
                    cs.release_kv()  # once the prefix is ready
            if entry is not None and not entry.ready:
                turn.prefix_wait = (entry.key, target)  # queued once the prefix is in the KV
            else:
                self._sync_kv(turn, target, entry)
            self.runner.start_turn(lease.index, cs.sampling, cs.counter)
            turn.sampler_started = True
            stream._set_active()

        self._per_stream(turn, prepare)

    def _sync_kv(self, turn: TurnState, target: Tensor, prefix: PrefixEntry | None) -> None:
        """Bring the conversation's cache to `target` (forking `prefix` when it helps) and
        queue the rows still missing ahead of the turn's lead."""
        cs = self.convs[turn.conv_id]
        before = cs.kv
        if prefix is not None and prefix.rows.shape[0] % self.kv.block_size:
            self.room.free_one_block(self._idle_with_kv)  # the fork copies the partial block
        turn.queue_rows(cs.sync_kv(self.kv, target, None if prefix is None else prefix.seq),
                        front=True)
        if prefix is not None and cs.kv is not before and cs.kv is not None and cs.kv.length > 0:
            self.metrics.add("prefix_forks")

    def _resolve_prefix_waits(self) -> None:
        """Turns waiting for a voice prefix go on once it is ready (or gone: then they prefill
        it themselves, so a failed or evicted prefix never blocks a turn)."""
        for turn in list(self.active.values()):
            if turn.prefix_wait is None or turn.done:
                continue
            key, target = turn.prefix_wait
            entry = self.prefixes.get(key)
            if entry is not None and entry.stalled:
                self.prefixes.drop(entry)
                entry = None
            if entry is None or entry.ready:
                turn.prefix_wait = None
                self._per_stream(turn, lambda t=turn, r=target, e=entry: self._sync_kv(t, r, e))

    # -- ending turns ---------------------------------------------------------------------------
    def _per_stream(self, turn: TurnState, fn: Callable[[], T]) -> T | None:
        """Run per-stream work; an exception fails only that stream."""
        try:
            return fn()
        except Exception as exc:
            self._fail(turn, exc)
        return None

    def _fail(self, owner: TurnState | PrefixEntry, exc: Exception) -> None:
        """End a turn with its error: our own errors as they are, anything else wrapped. A
        voice prefix that fails is dropped; the turns waiting for it prefill it themselves."""
        if isinstance(owner, PrefixEntry):
            log.warning("prefill of a voice prefix failed: %r", exc)
            self.prefixes.drop(owner)
            return
        if not isinstance(exc, MossError):
            exc = _wrap(owner.stream, exc)
        self._end_turn(owner, exc)

    def _end_turn(self, turn: TurnState, error: BaseException | None, *,
                  cancelled: bool = False) -> None:
        """Stop a turn (normal end, stop or failure): free its slot, record what was heard."""
        if turn.done:
            return
        turn.done = True
        self.active.pop(turn.stream.turn_id, None)
        cs = self.convs.get(turn.conv_id)
        try:
            if self.slots.valid(turn.lease):
                if cs is not None and turn.sampler_started:
                    cs.counter = self.runner.counter(turn.lease.index)
                self.slots.release(turn.lease)
            if cs is not None:
                cs.active, cs.last_used = None, time.monotonic()
                self._keep_heard(cs, turn, error)
                cs.publish()  # also after a failure: the turn may have trimmed old turns
        finally:  # whatever went wrong above, the consumer sees the end of its turn
            name = "turns_cancelled" if cancelled else "turns_failed" if error else "turns_finished"
            self.metrics.add(name)
            log.debug("turn %d ended (%s): %d frames, ttfa %s", turn.stream.turn_id, name,
                      len(turn.frames), turn.stream.ttfa_s)
            if error is not None:
                log.info("turn %d failed: %r", turn.stream.turn_id, error)
            self._turn_over(turn.stream, None if cancelled else error, released=cancelled)

    def _keep_heard(self, cs: ConvState, turn: TurnState, error: BaseException | None) -> None:
        """Record the turn as heard. A failed turn keeps the audio it delivered (the listener
        heard it, as after a stop) and stays cuttable by a later `mark_played`."""
        try:
            heard = turn.heard(turn.played_s)
            if heard is not None:
                cs.history.turns.append(heard)
        except Exception:
            if error is None:
                raise  # the turn fails with it
            log.exception("turn %d: its delivered audio is not kept", turn.stream.turn_id)
            return
        if error is None or heard is not None:
            cs.finished.append(turn)

    def _turn_over(self, stream: TurnStream, error: BaseException | None, *,
                   released: bool = False) -> None:
        """Release admission before the consumer can see the end (its next speak() fits);
        `released`: a stop already released it, on the caller's side, with its command."""
        if not released:
            self.inbox.release_turn(stream.turn_id)
        if error is not None:
            self.metrics.record_error(error)
        stream._finish(error)


def _add_users(cs: ConvState, users: tuple[PendingUser, ...], *, skip_empty: bool) -> None:
    """Add encoded user turns to the history, all or none. With `skip_empty`, speech shorter
    than one frame with no words is skipped (nothing was said) instead of failing the reply."""
    turns = [(u.text, None if u.codes is None else u.codes.result()) for u in users]
    if skip_empty:
        turns = [(text, codes) for text, codes in turns
                 if text.strip() or (codes is not None and codes.shape[0] > 0)]
    kept = list(cs.history.turns)
    try:
        for text, codes in turns:
            cs.history.add_user(text, codes)
    except BaseException:
        cs.history.turns[:] = kept
        raise


def _gone(owner: TurnState | PrefixEntry) -> bool:
    return owner.dropped if isinstance(owner, PrefixEntry) else owner.done


def _wrap(stream: TurnStream, exc: BaseException) -> StreamFailed:
    failed = StreamFailed(f"turn {stream.turn_id} failed: {exc!r}")
    failed.__cause__ = exc
    return failed


def _pool_error(exc: Exception) -> Exception:
    """A full pool at run time would be an accounting bug (admission keeps room for every
    speaking turn): say so with the retryable error, never as the conversation's overflow."""
    if isinstance(exc, KVPoolExhausted):
        log.error("KV pool exhausted during a step (admission should have kept room): %s", exc)
        err = CapacityError(f"KV pool exhausted while the turn was speaking: {exc}")
        err.__cause__ = exc
        return err
    return exc
