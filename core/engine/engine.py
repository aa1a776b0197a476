"""Engine: one per device; owns the model, codec and KV pool and runs one scheduler thread.

Callers (any asyncio loop, any thread) only post commands and push text; the engine thread
loops `collect -> plan -> run -> deliver`. Each tick serves every active stream with one batched
backbone call, one depth pass and one codec decode step (`ModelRunner`). Failures are contained:
a fault while serving one stream fails that stream; the engine keeps serving the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from core.codec import MossAudioCodec
from core.conversation import Conversation, ConversationContext, PrefixCache
from core.engine.config import EngineConfig
from core.engine.metrics import EngineStats, Metrics
from core.engine.runner import MAX_REPETITION_WINDOW, ModelRunner, RowWork, StepOutput
from core.engine.scheduler import plan_step
from core.engine.slots import SlotTable
from core.engine.stream import TurnStatus, TurnStream
from core.engine.turn import TEXT_LEAD, ActiveTurn, Phase
from core.errors import (
    AdmissionError,
    EngineClosed,
    MossError,
    StreamCancelled,
    StreamFailed,
)
from core.hub import resolve_pretrained
from core.model import KVPool, MossTTSRealtime, SamplingParams
from core.prompt import PromptBuilder, TokenIds
from core.text import load_tokenizer
from core.voices import Voice, VoiceEncoder

log = logging.getLogger("core.engine")
_IDLE_S = 1.0  # sleep with no turn at all (every input sets the wake-up event anyway)
T = TypeVar("T")


class _ConvState:
    """Engine-thread bookkeeping of one conversation (its context lives in `conv.context`)."""

    __slots__ = ("conv", "queue", "active", "last_turn", "counter", "last_used")

    def __init__(self, conv: Conversation) -> None:
        self.conv = conv
        self.queue: deque[tuple[str, Any]] = deque()  # ("speak", stream) | ("user", job)
        self.active: ActiveTurn | None = None
        self.last_turn: ActiveTurn | None = None  # cancel(played_s) still applies to it
        self.counter = 0  # frames drawn: the conversation's random stream continues across turns
        self.last_used = 0.0


class Engine:
    """The shared streaming engine: many conversations, one model, batched steps."""

    def __init__(
        self,
        model: MossTTSRealtime,
        codec: MossAudioCodec,
        tokenizer: Any,
        *,
        config: EngineConfig | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.model, self.codec, self.tokenizer = model, codec, tokenizer
        self.device = model.device
        self.builder = PromptBuilder(tokenizer, TokenIds.from_tokenizer(tokenizer, model.config))
        self._prefixes = PrefixCache(self.builder)
        self._voices = VoiceEncoder(codec)
        self.kv = KVPool(model.config, num_blocks=_kv_blocks(config, model),
                         block_size=config.kv_block_size, device=self.device, dtype=model.dtype)
        self._runner = ModelRunner(model, codec, self.kv, num_slots=config.max_streams)
        self._slots = SlotTable(config.max_streams)
        self.metrics = Metrics()
        # Shared with caller threads (under _lock).
        self._lock = threading.Lock()
        self._commands: deque[Callable[[], None]] = deque()
        self._closed = False
        self._open_convs = 0
        self._outstanding: dict[int, int] = {}  # conv id -> turns queued or active
        self._admitted: dict[int, int] = {}  # turn id -> conv id, while counted in _outstanding
        self._next_id = 0
        self._wakeup = threading.Event()
        # Engine thread only.
        self._convs: dict[int, _ConvState] = {}
        self._active: dict[int, ActiveTurn] = {}  # turn id -> turn
        # Test hook: called on the engine thread with (turn id, raw logits [16, V]) per frame.
        self.trace_logits: Callable[[int, torch.Tensor], None] | None = None
        self._thread = threading.Thread(target=self._run, name="moss-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        codec: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        config: EngineConfig | None = None,
    ) -> Engine:
        """Load model (with its tokenizer) and codec from local dirs or hub ids.

        `dtype` is the model's compute dtype: default bfloat16 on CUDA, float32 on CPU
        (float64 is accepted for exactness tests). The codec always runs in float32.
        """
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model_dir = resolve_pretrained(model)
        load_dtype = torch.float32 if dtype == torch.float64 else dtype
        net = MossTTSRealtime.from_pretrained(model_dir, device=device, dtype=load_dtype)
        if dtype != load_dtype:
            net = net.to(dtype)
        audio_codec = MossAudioCodec.from_pretrained(codec, device=device)
        return cls(net, audio_codec, load_tokenizer(model_dir), config=config)

    # -- public API -----------------------------------------------------------------------------
    async def load_voice(self, source: Any, sample_rate: int | None = None) -> Voice:
        """Read, validate and encode reference audio on the engine thread (cached by content)."""
        return await self._call(lambda: self._voices.load(source, sample_rate))

    def conversation(
        self, voice: Voice | None = None, sampling: SamplingParams | None = None
    ) -> Conversation:
        """Open a conversation (one room / call).

        Raises:
            AdmissionError: `max_conversations` are already open.
            EngineClosed: the engine was closed.
        """
        sampling = sampling or SamplingParams()
        if sampling.repetition_window > MAX_REPETITION_WINDOW:
            raise ValueError(f"repetition_window must be <= {MAX_REPETITION_WINDOW}")
        if voice is not None and not isinstance(voice, Voice):
            raise TypeError(f"voice must be a Voice (engine.load_voice) or None, got {voice!r}")
        if sampling.seed is None:  # one random stream per conversation, continued across turns
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        with self._lock:
            self._check_open()
            if self._open_convs >= self.config.max_conversations:
                raise AdmissionError(
                    f"max_conversations={self.config.max_conversations} already open"
                )
            self._open_convs += 1
            conv_id = self._new_id()
        context = ConversationContext(
            self.builder, self._prefixes, voice=voice,
            max_rows=self.config.max_context_rows, trim_target=self.config.context_trim_target,
        )
        conv = Conversation(self, conv_id, context, sampling)
        self._post(lambda: self._convs.__setitem__(conv_id, _ConvState(conv)))
        return conv

    def stats(self) -> EngineStats:
        """Counters and recent performance (any thread)."""
        with self._lock:
            queued = sum(self._outstanding.values())
            convs = self._open_convs
        active = len(self._active)
        return self.metrics.snapshot(active=active, queued=max(0, queued - active),
                                     conversations=convs, kv_rows_free=self.kv.rows_free)

    def close(self) -> None:
        """End every stream with `EngineClosed`, stop the thread and release the device state."""
        with self._lock:
            if self._closed:
                already = True
            else:
                already, self._closed = False, True
        if not already:
            self._wakeup.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- called by TurnStream / Conversation (any thread) ----------------------------------------
    def _wake(self) -> None:
        self._wakeup.set()

    def _request_cancel(self, stream: TurnStream, played_s: float | None) -> None:
        with self._lock:
            if self._closed:
                return
            # Released and queued atomically: the cancel runs before any speak() admitted after
            # it, so that turn finds this turn's slot free.
            self._release_admission(stream.turn_id)
            self._commands.append(lambda: self._cancel(stream, played_s))
        self._wakeup.set()

    def _release_admission(self, turn_id: int) -> None:
        """Stop counting a turn against max_streams (caller holds _lock); idempotent."""
        conv_id = self._admitted.pop(turn_id, None)
        if conv_id is not None:
            self._outstanding[conv_id] -= 1
            if self._outstanding[conv_id] <= 0:
                del self._outstanding[conv_id]

    def _speak(self, conv: Conversation) -> TurnStream:
        with self._lock:
            self._check_open()
            if conv.closed:
                raise EngineClosed("this conversation was closed")
            busy = self._outstanding.get(conv.conv_id, 0)
            speaking = sum(1 for n in self._outstanding.values() if n > 0)
            if busy == 0 and speaking >= self.config.max_streams:
                raise AdmissionError(f"max_streams={self.config.max_streams} turns already speaking")
            self._outstanding[conv.conv_id] = busy + 1
            stream = TurnStream(self, self._new_id(), self.config.max_text_chars)
            self._admitted[stream.turn_id] = conv.conv_id
            self._commands.append(lambda: self._enqueue(conv.conv_id, ("speak", stream)))
        self._wakeup.set()
        return stream

    async def _add_user_turn(
        self, conv: Conversation, text: str, audio: Any, sample_rate: int | None
    ) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if len(text) > self.config.max_text_chars:
            from core.errors import TextTooLongError

            raise TextTooLongError(
                f"user text has {len(text)} characters, max_text_chars={self.config.max_text_chars}"
            )
        if audio is not None and sample_rate is None and not isinstance(audio, str | Path | bytes):
            raise ValueError("sample_rate is required with raw audio samples")
        if conv.closed:
            raise EngineClosed("this conversation was closed")
        def add() -> None:
            codes = None
            if audio is not None:
                codes = self._voices.encode_user_audio(audio, sample_rate)  # type: ignore[arg-type]
            conv.context.add_user(text, codes)
            conv._publish()

        loop = asyncio.get_running_loop()
        job = _Job(add, loop, loop.create_future())
        self._post(_Enqueue(self, conv.conv_id, job))
        await job.fut

    def _set_voice(self, conv: Conversation, voice: Voice | None) -> None:
        if voice is not None and not isinstance(voice, Voice):
            raise TypeError(f"voice must be a Voice or None, got {voice!r}")

        def apply() -> None:
            conv.context.voice = voice

        self._post(apply)

    def _close_conversation(self, conv: Conversation) -> None:
        with self._lock:  # its place is free at once: the drop runs before any later command
            self._open_convs -= 1
            if self._closed:
                return
            for turn_id in [t for t, c in self._admitted.items() if c == conv.conv_id]:
                self._release_admission(turn_id)
            self._commands.append(lambda: self._drop_conversation(conv.conv_id))
        self._wakeup.set()

    # -- helpers ----------------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("the engine was closed")

    def _post(self, command: Callable[[], None], *, strict: bool = True) -> None:
        with self._lock:
            if self._closed:
                if strict:
                    raise EngineClosed("the engine was closed")
                return
            self._commands.append(command)
        self._wakeup.set()

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread and await its result from the caller's loop."""
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop, loop.create_future())
        self._post(job)
        return await job.fut

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while True:
                self._wakeup.clear()
                with self._lock:
                    commands, self._commands = self._commands, deque()
                    closing = self._closed
                for command in commands:
                    self._guard(command)
                if closing:
                    break
                timeout = self._guard(self._tick)
                if timeout is not None:
                    self._wakeup.wait(timeout)
        finally:
            self._shutdown()

    def _guard(self, fn: Callable[[], T]) -> T | None:
        """Run engine-thread work; an unexpected error is logged, never kills the thread."""
        try:
            return fn()
        except Exception:  # a bug: keep serving, but make it loud
            log.exception("engine thread error")
            return self.config.idle_wait_s

    def _shutdown(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, deque()
        for command in commands:  # jobs never run: their callers get EngineClosed
            if isinstance(command, _Job | _Enqueue):
                command.fail(EngineClosed("the engine was closed"))
        for cs in self._convs.values():
            for item in cs.queue:
                self._reject(item, EngineClosed("the engine was closed"))
            cs.queue.clear()
        for turn in list(self._active.values()):
            turn.stream._finish(EngineClosed("the engine was closed"))
        self._active.clear()

    def _enqueue(self, conv_id: int, item: tuple[str, Any]) -> None:
        cs = self._convs.get(conv_id)
        if cs is None:
            self._reject(item, EngineClosed("this conversation was closed"))
            return
        cs.queue.append(item)

    def _reject(self, item: tuple[str, Any], error: BaseException) -> None:
        kind, payload = item
        if kind == "speak":
            self._turn_over(payload, error)
        else:
            payload.fail(error)

    def _tick(self) -> float | None:
        """One scheduler step; returns how long to sleep (None: run again at once)."""
        now = time.monotonic()
        self._admit(now)
        for turn in list(self._active.values()):
            self._per_stream(turn, lambda t=turn: t.ingest_text(now))
            if turn.phase is not Phase.DONE and turn.empty_text:
                self._end_turn(turn, None)
        demands = [t.demand(sid, now) for sid, t in self._active.items()]
        cfg = self.config
        plan = plan_step(demands, max_batch=cfg.max_batch, prefill_chunk=cfg.prefill_chunk,
                         lead_s=cfg.lead_s)
        if plan.empty:
            if not self._active and not any(cs.queue for cs in self._convs.values()):
                return _IDLE_S  # nothing to do until a command or text wakes us
            return cfg.idle_wait_s if plan.wake_in_s is None else min(plan.wake_in_s, cfg.idle_wait_s)
        work: list[tuple[ActiveTurn, RowWork]] = []
        for chunk in plan.prefill:
            turn = self._active[chunk.sid]
            rows = turn.take_prefill(chunk.rows)
            slot = turn.lease.index if chunk.samples else None
            work.append((turn, RowWork(self._seq(turn), rows, slot)))
        for sid in plan.decode:
            turn = self._active[sid]
            row = self._per_stream(turn, turn.step_row)
            if row is not None:
                work.append((turn, RowWork(self._seq(turn), row, turn.lease.index)))
        if work:
            self._execute(work)
        return None

    def _seq(self, turn: ActiveTurn) -> int:
        seq = self._convs[turn.conv_id].conv.context.seq_id
        assert seq is not None, "an active turn always has a KV sequence"
        return seq

    def _per_stream(self, turn: ActiveTurn, fn: Callable[[], T]) -> T | None:
        """Run per-stream work; an exception fails only that stream."""
        try:
            return fn()
        except MossError as exc:
            self._end_turn(turn, exc)
        except Exception as exc:
            failed = StreamFailed(f"turn {turn.stream.turn_id} failed: {exc}")
            failed.__cause__ = exc
            self._end_turn(turn, failed)
        return None

    def _execute(self, work: list[tuple[ActiveTurn, RowWork]]) -> None:
        """Run a tick; if the batch fails, roll back and run each stream alone to isolate it."""
        self._make_room(sum(int(w.rows.shape[0]) for _, w in work))
        started = time.monotonic()
        out = self._try_step(work)
        if out is None and len(work) > 1:
            for item in work:
                if item[0].phase is Phase.DONE:
                    continue
                single = self._try_step([item])
                if single is not None:
                    self._apply([item], single)
            out_frames = 0
        elif out is None:
            out_frames = 0
        else:
            self._apply(work, out)
            out_frames = int(out.codes.shape[0])
        self.metrics.record_step(time.monotonic() - started, out_frames)

    def _try_step(self, work: list[tuple[ActiveTurn, RowWork]]) -> StepOutput | None:
        ctxs = [self._convs[t.conv_id].conv.context for t, _ in work]
        lengths = [c.kv_len for c in ctxs]
        slots = [w.slot for _, w in work if w.slot is not None]
        snap = self._runner.snapshot(slots) if slots else None
        try:
            return self._runner.step([w for _, w in work],
                                     want_logits=self.trace_logits is not None)
        except Exception as exc:
            for ctx, n in zip(ctxs, lengths, strict=True):
                if ctx.seq_id is not None and self.kv.length(ctx.seq_id) != n:
                    ctx.kv_truncate(self.kv, n)
            if snap is not None:
                self._runner.restore(snap)
            if len(work) == 1:
                turn = work[0][0]
                self._per_stream(turn, lambda e=exc: _reraise(e))
            else:
                log.warning("batched step failed (%s); isolating the failing stream", exc)
            return None

    def _apply(self, work: list[tuple[ActiveTurn, RowWork]], out: StepOutput) -> None:
        now = time.monotonic()
        j = 0
        for turn, w in work:
            ctx = self._convs[turn.conv_id].conv.context
            ctx.kv_appended(w.rows)
            if w.slot is None:
                continue
            codes, pcm = out.codes[j], out.pcm[j]
            if out.logits is not None and self.trace_logits is not None:
                self.trace_logits(turn.stream.turn_id, out.logits[j])
            j += 1
            if turn.phase is Phase.DONE:
                continue
            self._per_stream(turn, lambda t=turn, c=codes, p=pcm: self._deliver(t, c, p, now))

    def _deliver(self, turn: ActiveTurn, codes: torch.Tensor, pcm: torch.Tensor | None,
                 now: float) -> None:
        alive = turn.accept_frame(codes, pcm)
        chunk = turn.take_chunk(now, final=not alive)
        if chunk is not None:
            if chunk.start_s == 0.0 and turn.lead_ready_at is not None:
                ttfa = now - turn.lead_ready_at
                turn.stream.ttfa_s = ttfa
                self.metrics.record_ttfa(ttfa)
            turn.stream.frames = len(turn.frames)
            turn.stream.channel.put(chunk)
        if turn.underruns:
            self.metrics.add("underruns", turn.underruns)
            turn.underruns = 0
        if not alive:
            self._end_turn(turn, None)

    def _make_room(self, rows: int) -> None:
        """Evict idle conversations' KV (least recently used first) when the pool runs low."""
        need = rows + self.kv.block_size * max(1, len(self._active))
        if self.kv.rows_free >= need:
            return
        idle = sorted((cs for cs in self._convs.values()
                       if cs.active is None and cs.conv.context.seq_id is not None),
                      key=lambda cs: cs.last_used)
        for cs in idle:
            cs.conv.context.release_kv(self.kv)
            log.info("evicted the KV cache of idle conversation %d", cs.conv.conv_id)
            if self.kv.rows_free >= need:
                return

    # -- turn lifecycle (engine thread) -----------------------------------------------------------
    def _admit(self, now: float) -> None:
        for cs in self._convs.values():
            while cs.active is None and cs.queue:
                kind, item = cs.queue.popleft()
                if kind == "user":
                    item()
                else:
                    self._start_turn(cs, item, now)

    def _start_turn(self, cs: _ConvState, stream: TurnStream, now: float) -> None:
        if stream.status is not TurnStatus.QUEUED:  # cancelled while queued
            self._turn_over(stream, None)
            return
        cs.last_turn = None
        lease = self._slots.acquire()
        assert lease is not None, "admission guarantees a slot per speaking conversation"
        turn = ActiveTurn(stream, cs.conv.conv_id, lease, builder=self.builder,
                          tokenizer=self.tokenizer, config=self.config,
                          sample_rate=self.codec.sample_rate, now=now)
        self._active[stream.turn_id] = turn
        cs.active = turn
        cs.last_used = now
        self.metrics.add("turns_started")
        reserve = TEXT_LEAD + self.config.max_frames_per_turn + 1

        def prepare() -> None:
            ctx = cs.conv.context
            target = ctx.begin_assistant(reserve)
            turn.queue_rows(ctx.sync_kv(self.kv, target))
            self._runner.start_turn(lease.index, cs.conv.sampling, cs.counter)
            turn.sampler_started = True
            stream._set_active()

        self._per_stream(turn, prepare)

    def _end_turn(self, turn: ActiveTurn, error: BaseException | None,
                  *, cancelled: bool = False, played_s: float | None = None) -> None:
        """Stop a turn (normal end, cancel or failure): free its slot, record what was heard."""
        if turn.phase is Phase.DONE:
            return
        turn.phase = Phase.DONE
        self._active.pop(turn.stream.turn_id, None)
        cs = self._convs.get(turn.conv_id)
        if self._slots.valid(turn.lease):
            if cs is not None and turn.sampler_started:
                cs.counter = self._runner.counter(turn.lease.index)
            self._slots.release(turn.lease)
        if cs is not None:
            cs.active = None
            cs.last_used = time.monotonic()
            if error is None:
                self._record(cs, turn, played_s)
                cs.last_turn = turn
        if cancelled:
            self.metrics.add("turns_cancelled")
        elif error is None:
            self.metrics.add("turns_finished")
        else:
            self.metrics.add("turns_failed")
            log.info("turn %d failed: %r", turn.stream.turn_id, error)
        self._turn_over(turn.stream, None if cancelled else error)

    def _record(self, cs: _ConvState, turn: ActiveTurn, played_s: float | None) -> None:
        heard = turn.heard(played_s)
        if heard is not None:
            cs.conv.context.add_assistant(turn.stream.turn_id, heard.text, heard.text_ids,
                                          heard.frames)
        cs.conv._publish()

    def _turn_over(self, stream: TurnStream, error: BaseException | None) -> None:
        with self._lock:  # before the consumer can see the end: its next speak() is admitted
            self._release_admission(stream.turn_id)
        stream._finish(error)
        self._wakeup.set()

    def _cancel(self, stream: TurnStream, played_s: float | None) -> None:
        turn = self._active.get(stream.turn_id)
        if turn is not None:
            self._end_turn(turn, None, cancelled=True, played_s=played_s)
            return
        for cs in self._convs.values():
            for item in list(cs.queue):
                if item == ("speak", stream):
                    cs.queue.remove(item)
                    self.metrics.add("turns_cancelled")
                    self._turn_over(stream, None)
                    return
            last = cs.last_turn
            if last is not None and last.stream is stream:
                heard = last.heard(played_s)
                ctx = cs.conv.context
                if heard is None:
                    ctx.remove_assistant(stream.turn_id)
                else:
                    ctx.replace_assistant(stream.turn_id, heard.text, heard.text_ids, heard.frames)
                cs.conv._publish()
                return

    def _drop_conversation(self, conv_id: int) -> None:
        cs = self._convs.get(conv_id)
        if cs is None:
            return
        for item in cs.queue:
            self._reject(item, StreamCancelled("the conversation was closed"))
        cs.queue.clear()
        if cs.active is not None:
            self._end_turn(cs.active, StreamCancelled("the conversation was closed"))
        del self._convs[conv_id]
        cs.conv.context.release_kv(self.kv)


def _kv_blocks(config: EngineConfig, model: MossTTSRealtime) -> int:
    """Pool size: explicit, or from the conversation limit, capped by free CUDA memory."""
    if config.kv_num_blocks is not None:
        return config.kv_num_blocks
    blocks = config.num_kv_blocks
    if model.device.type == "cuda":
        bb = model.config.backbone
        row_bytes = 2 * bb.num_layers * bb.num_kv_heads * bb.head_dim * model.dtype.itemsize
        free, _total = torch.cuda.mem_get_info(model.device)
        cap = int(free * config.kv_memory_fraction) // (row_bytes * config.kv_block_size)
        if cap < blocks:
            log.warning("KV pool capped by device memory: %d blocks instead of %d", cap, blocks)
        blocks = max(1, min(blocks, cap))
    return blocks


class _Job:
    """Work for the engine thread whose result an asyncio caller awaits (in its own loop)."""

    def __init__(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop,
                 fut: asyncio.Future[Any]) -> None:
        self.fn, self.loop, self.fut = fn, loop, fut

    def __call__(self) -> None:
        try:
            result, error = self.fn(), None
        except Exception as exc:
            result, error = None, exc
        self._resolve(result, error)

    def fail(self, error: BaseException) -> None:
        self._resolve(None, error)

    def _resolve(self, result: Any, error: BaseException | None) -> None:
        fut = self.fut

        def resolve() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        try:
            self.loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the caller's loop is gone
            pass


class _Enqueue:
    """Command: put a user turn into its conversation's FIFO (behind queued turns)."""

    def __init__(self, engine: Engine, conv_id: int, job: _Job) -> None:
        self.engine, self.conv_id, self.job = engine, conv_id, job

    def __call__(self) -> None:
        self.engine._enqueue(self.conv_id, ("user", self.job))

    def fail(self, error: BaseException) -> None:
        self.job.fail(error)


def _reraise(exc: BaseException) -> None:
    raise exc

