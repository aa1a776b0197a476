"""Engine: one per device; owns the model, codec and KV pool and runs one scheduler thread.

Callers (any asyncio loop, any thread) only post commands and push text through the `Gate`; the
engine thread (`Worker`) loops `commands -> admit -> plan -> run -> deliver`. Each tick serves
every active stream with one batched backbone call, one depth pass and one codec decode step
(`ModelRunner`). A fault while serving one stream fails that stream; the rest keep going.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from core.audio import inspect_audio
from core.codec import MossAudioCodec
from core.conversation import Conversation, ConversationContext, PrefixCache
from core.device import resolve_device
from core.engine.config import EngineConfig
from core.engine.gate import Gate, Job
from core.engine.metrics import EngineStats
from core.engine.runner import ModelRunner
from core.engine.stream import TurnStream
from core.engine.worker import SPEAK, Enqueue, Worker
from core.errors import EngineClosed, TextTooLongError
from core.hub import resolve_pretrained
from core.model import KVPool, MossTTSRealtime, SamplingParams
from core.prompt import PromptBuilder, TokenIds
from core.text import load_tokenizer
from core.voices import Voice, VoiceEncoder

log = logging.getLogger("core.engine")
T = TypeVar("T")


class Engine:
    """The shared streaming engine: many conversations, one model, batched steps.

    Build it with `Engine.from_pretrained(model, codec, device=..., config=EngineConfig(...))`
    (or around already loaded parts), open conversations with `conversation()`, and `close()`
    it at the end. All methods are safe from any thread and any asyncio loop.
    """

    def __init__(self, model: MossTTSRealtime, codec: MossAudioCodec, tokenizer: Any, *,
                 config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model, self.codec, self.tokenizer = model, codec, tokenizer
        self.device = model.device
        self.builder = PromptBuilder(tokenizer, TokenIds.from_tokenizer(tokenizer, model.config))
        self._prefixes = PrefixCache(self.builder)
        self._voices = VoiceEncoder(codec)
        self.kv = KVPool(model.config, num_blocks=_kv_blocks(config, model),
                         block_size=config.kv_block_size, device=self.device, dtype=model.dtype)
        self._gate = Gate(config.max_streams, config.max_conversations,
                          config.max_turns_per_conversation)
        runner = ModelRunner(model, codec, self.kv, num_slots=config.max_streams)
        self._worker = Worker(config=config, gate=self._gate, runner=runner, kv=self.kv,
                              builder=self.builder, tokenizer=tokenizer,
                              sample_rate=codec.sample_rate)
        # Voices and user audio are encoded here, off the tick path: a minute of user audio costs
        # seconds of codec time on a CPU, and on the engine thread it stalled every stream.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moss-encoder")
        self._encoder.submit(torch.set_grad_enabled, False)  # starts its thread with the engine's
        self._encode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="moss-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        codec: str | Path,
        *,
        device: str | torch.device = "auto",
        dtype: torch.dtype | None = None,
        config: EngineConfig | None = None,
    ) -> Engine:
        """Load model (with its tokenizer) and codec from local dirs or hub ids.

        `device` is "auto" (CUDA when available, else the CPU with a warning), "cpu" or "cuda:N".
        `dtype` is the model's compute dtype: default bfloat16 on CUDA, float32 on CPU
        (float64 is accepted for exactness tests). The codec always runs in float32.
        """
        device = resolve_device(device)
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
        """Read, validate and encode reference audio on the encoder thread (cached by content).

        What needs no decoding (sample rate 8..192 kHz, type, dtype, shape, length and size from
        the shape or header) is checked here first, so bad input never reaches the engine thread.

        Raises:
            InvalidAudioError: unreadable, too short/long (over 30 s), silent or clipped audio; a
                sample rate outside 8..192 kHz; an unusable type, dtype or shape.
        """
        self._voices.check(source, sample_rate)
        return await self._encode(lambda: self._voices.load(source, sample_rate))

    def conversation(
        self, voice: Voice | None = None, sampling: SamplingParams | None = None
    ) -> Conversation:
        """Open a conversation (one room / call).

        Raises:
            AdmissionError: `max_conversations` are already open.
            EngineClosed: the engine was closed.
        """
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {sampling!r}")
        if voice is not None and not isinstance(voice, Voice):
            raise TypeError(f"voice must be a Voice (engine.load_voice) or None, got {voice!r}")
        if sampling.seed is None:  # one random stream per conversation, continued across turns
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        context = ConversationContext(
            self.builder, self._prefixes, voice=voice, max_rows=self.config.max_context_rows,
            trim_target=self.config.context_trim_target,
        )
        conv = Conversation(self, self._gate.open_conversation(), context, sampling)
        self._gate.post(lambda: self._worker.add_conversation(conv))
        return conv

    def stats(self) -> EngineStats:
        """Counters and recent performance (any thread)."""
        outstanding, convs = self._gate.counts()
        active = len(self._worker.active)
        return self._worker.metrics.snapshot(
            active=active, queued=max(0, outstanding - active), conversations=convs,
            kv_rows_free=self.kv.rows_free,
        )

    def close(self) -> None:
        """End every stream with `EngineClosed` and stop the engine thread (idempotent)."""
        self._gate.close()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        self._encoder.shutdown(wait=True, cancel_futures=True)

    async def aclose(self) -> None:
        """`close()` without blocking the caller's event loop while the thread stops."""
        await asyncio.to_thread(self.close)

    @property
    def closed(self) -> bool:
        return self._gate.closed

    @property
    def trace_logits(self) -> Callable[[int, torch.Tensor], None] | None:
        """Test hook: called on the engine thread with (turn id, logits [16, V]) per frame."""
        return self._worker.executor.trace_logits

    @trace_logits.setter
    def trace_logits(self, hook: Callable[[int, torch.Tensor], None] | None) -> None:
        self._worker.executor.trace_logits = hook

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- called by TurnStream / Conversation (any thread) ----------------------------------------
    def _wake(self) -> None:
        self._gate.wake()

    def _request_cancel(self, stream: TurnStream, played_s: float | None) -> None:
        self._gate.cancel_turn(stream.turn_id, lambda: self._worker.cancel(stream, played_s))

    def _speak(self, conv: Conversation) -> TurnStream:
        if conv.closed:
            raise EngineClosed("this conversation was closed")
        stream = TurnStream(self, self._gate.admit_turn(conv.conv_id), self.config.max_text_chars)
        self._gate.post(lambda: self._worker.enqueue(conv.conv_id, (SPEAK, stream)))
        return stream

    async def _add_user_turn(
        self, conv: Conversation, text: str, audio: Any, sample_rate: int | None
    ) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if len(text) > self.config.max_text_chars:
            raise TextTooLongError(f"user text has {len(text)} characters, max_text_chars="
                                   f"{self.config.max_text_chars}")
        max_s = self.config.max_user_audio_s
        if audio is not None:  # rate, type, dtype, shape, length: refused before any decoding
            inspect_audio(audio, sample_rate, max_seconds=max_s, limit="max_user_audio_s")
        if conv.closed:
            raise EngineClosed("this conversation was closed")

        codes = None
        if audio is not None:
            codes = await self._encode(
                lambda: self._voices.encode_user_audio(audio, sample_rate, max_s))

        def add() -> None:
            conv.context.add_user(text, codes)
            conv._publish()

        job = Job(add, asyncio.get_running_loop())
        self._gate.post(Enqueue(self._worker, conv.conv_id, job))
        await job.fut

    def _set_voice(self, conv: Conversation, voice: Voice | None) -> None:
        if voice is not None and not isinstance(voice, Voice):
            raise TypeError(f"voice must be a Voice or None, got {voice!r}")

        def apply() -> None:
            conv.context.voice = voice

        self._gate.post(apply)

    def _close_conversation(self, conv: Conversation) -> None:
        self._gate.close_conversation(conv.conv_id,
                                      lambda: self._worker.drop_conversation(conv.conv_id))

    async def _encode(self, fn: Callable[[], T]) -> T:
        """Run codec work on the encoder thread (its own CUDA stream), never on the tick path."""
        if self.closed:
            raise EngineClosed("the engine was closed")

        def run() -> T:
            if self._encode_stream is None:
                return fn()
            with torch.cuda.stream(self._encode_stream):
                return fn()  # results come back on the CPU, which waits for this stream

        try:
            return await asyncio.get_running_loop().run_in_executor(self._encoder, run)
        except RuntimeError as exc:  # the executor was shut down by a concurrent close()
            if self.closed:
                raise EngineClosed("the engine was closed") from exc
            raise

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while self._run_commands():
                timeout = self._guard(self._worker.tick)
                if timeout is not None:
                    self._gate.wait(timeout)
        finally:
            self._worker.shutdown(self._gate.take()[0])

    def _run_commands(self) -> bool:
        """Run the queued commands; False once the engine is closing. Its own frame, so the
        last command (a closure over a conversation: after a close, its whole history) is
        released here, not kept by a loop variable while the engine idles."""
        commands, closing = self._gate.take()
        for command in commands:
            self._guard(command)
        return not closing

    def _guard(self, fn: Callable[[], T]) -> T | float:
        """Run engine-thread work; an unexpected error is logged, never kills the thread."""
        try:
            return fn()
        except Exception:  # a bug: keep serving, but make it loud
            log.exception("engine thread error")
            return self.config.idle_wait_s


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
