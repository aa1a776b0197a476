"""Engine: one per device. It loads the parts, starts the engine thread (`EngineLoop`) and the
encoder thread, and hands out conversations; everything else happens on those threads.

Callers (any asyncio loop, any thread) only post typed commands to the `Inbox` and read chunks
from their streams. Codec encodes (voices, user speech) run on the encoder thread (its own CUDA
stream), so a long recording never stalls a tick.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from core.audio import AudioSource
from core.codec import MossAudioCodec
from core.device import resolve_device
from core.engine.commands import OpenConversation, TurnsView
from core.engine.config import EngineConfig
from core.engine.conversation import Conversation, opening_settings
from core.engine.inbox import Inbox
from core.engine.loop import EngineLoop
from core.engine.metrics import EngineStats
from core.engine.runner import ModelRunner
from core.errors import EngineClosed
from core.history import History, PrefixRows
from core.hub import resolve_pretrained
from core.model import KVPool, MossTTSRealtime
from core.prompt import PromptBuilder, TokenIds
from core.text import load_tokenizer
from core.values import PastTurn, SamplingParams, Voice
from core.voices import VoiceEncoder

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
        self._prefix_rows = PrefixRows(self.builder)
        self._voices = VoiceEncoder(codec)
        self.kv = KVPool(model.config, num_blocks=config.kv_pool_blocks(_device_blocks(config, model)),
                         block_size=config.kv_block_size, device=self.device, dtype=model.dtype)
        self._inbox = Inbox(config.max_streams, config.max_conversations,
                            config.max_turns_per_conversation)
        runner = ModelRunner(model, codec, self.kv, num_slots=config.max_streams,
                             compile_step=config.compile_step)
        # Compiled before the engine thread starts: never on the hot path of a live stream.
        self.warmup_s = runner.warm_up()
        self._loop = EngineLoop(
            config=config, inbox=self._inbox, kv=self.kv, builder=self.builder, runner=runner,
            tokenizer=tokenizer, sample_rate=codec.sample_rate)
        # The history budget: the configured rows, at most the positions the model was built for.
        self._max_rows = min(config.max_context_rows, model.config.backbone.max_position_embeddings)
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
    def check_voice(self, source: AudioSource, sample_rate: int | None = None) -> None:
        """Refuse reference audio that cannot be used, without decoding it: a missing file, a
        sample rate outside 8..192 kHz, an unusable type, dtype or shape, over 30 s.

        Raises:
            InvalidAudioError: with what is wrong.
        """
        self._voices.check(source, sample_rate)

    async def load_voice(self, source: AudioSource, sample_rate: int | None = None) -> Voice:
        """Read, validate and encode reference audio on the encoder thread. Cached: by content,
        and for a file by its path, size and modification time (a second load reads nothing).

        Raises:
            InvalidAudioError: unreadable, too short/long (over 30 s), silent or clipped audio; a
                sample rate outside 8..192 kHz; an unusable type, dtype or shape.
        """
        self._voices.check(source, sample_rate)
        return await asyncio.wrap_future(
            self._submit(lambda: self._voices.load(source, sample_rate)))

    def conversation(
        self, voice: Voice | None = None, sampling: SamplingParams | None = None,
        history: Sequence[PastTurn] = (), *, session_id: str | None = None,
    ) -> Conversation:
        """Open a conversation (one room / call); `history` continues one that another engine
        had (its `Conversation.history`: the turns as heard, with their codes). `session_id`
        names it (a remote engine routes by it; here it is only a label).

        Raises:
            AdmissionError: `max_conversations` are already open.
            EngineClosed: the engine was closed.
            TypeError, ValueError: a `history` this model cannot use (nothing is opened).
        """
        voice, sampling = opening_settings(voice, sampling)
        past = History(self.builder, self._prefix_rows, voice=voice, max_rows=self._max_rows,
                       trim_target=self.config.context_trim_target)
        past.restore(history)
        conv_id = self._inbox.open_conversation()
        view = TurnsView(past.view(), past.past())
        self._inbox.post(OpenConversation(conv_id, past, sampling, view))
        conv = Conversation(self._inbox, conv_id, view, voice=voice, sampling=sampling,
                            config=self.config, encode_user=self._encode_user)
        conv.session_id = session_id or f"local-{conv_id}"
        return conv

    def stats(self) -> EngineStats:
        """Counters and recent performance (any thread)."""
        return self._loop.stats(*self._inbox.counts())

    def close(self) -> None:
        """End every stream with `EngineClosed` and stop the engine thread (idempotent)."""
        self._inbox.close()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        self._encoder.shutdown(wait=True, cancel_futures=True)

    async def aclose(self) -> None:
        """`close()` without blocking the caller's event loop while the thread stops."""
        await asyncio.to_thread(self.close)

    @property
    def closed(self) -> bool:
        return self._inbox.closed

    @property
    def trace_logits(self) -> Callable[[int, Tensor], None] | None:
        """Test hook: called on the engine thread with (turn id, logits [16, V]) per frame."""
        return self._loop.trace_logits

    @trace_logits.setter
    def trace_logits(self, hook: Callable[[int, Tensor], None] | None) -> None:
        self._loop.trace_logits = hook

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- threads --------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        self._loop.run_forever()

    def _encode_user(self, audio: AudioSource, sample_rate: int | None) -> Future[Tensor]:
        """User speech -> codes on the encoder thread; the engine thread wakes when they are in."""
        max_s = self.config.max_user_audio_s
        fut = self._submit(lambda: self._voices.encode_user_audio(audio, sample_rate, max_s))
        fut.add_done_callback(lambda _: self._inbox.wake())
        return fut

    def _submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run codec work on the encoder thread (its own CUDA stream), never on the tick path."""
        if self.closed:
            raise EngineClosed("the engine was closed")

        def run() -> T:
            if self._encode_stream is None:
                return fn()
            with torch.cuda.stream(self._encode_stream):
                return fn()  # results come back on the CPU, which waits for this stream

        try:
            return self._encoder.submit(run)
        except RuntimeError as exc:  # the executor was shut down by a concurrent close()
            raise EngineClosed("the engine was closed") from exc


def _device_blocks(config: EngineConfig, model: MossTTSRealtime) -> int | None:
    """KV blocks `kv_memory_fraction` of the free CUDA memory holds (None off CUDA)."""
    if model.device.type != "cuda":
        return None
    bb = model.config.backbone
    row_bytes = 2 * bb.num_layers * bb.num_kv_heads * bb.head_dim * model.dtype.itemsize
    free, _total = torch.cuda.mem_get_info(model.device)
    blocks = int(free * config.kv_memory_fraction) // (row_bytes * config.kv_block_size)
    if config.kv_num_blocks is None and blocks < config.kv_pool_blocks():
        log.warning("KV pool capped by device memory: %d blocks instead of %d", blocks,
                    config.kv_pool_blocks())
    return blocks
