"""EngineConfig: every limit and budget of the shared engine in one frozen place.

Each limit exists so that a misbehaving caller gets a clear error instead of an unbounded queue,
an unbounded turn or an out-of-memory crash (ARCHITECTURE.md, decision 7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Limits, budgets and pacing of one `Engine`.

    Attributes:
        max_streams: turns generating at once; `speak()` beyond raises `AdmissionError`.
        max_conversations: open conversations; `conversation()` beyond raises `AdmissionError`.
        max_turns_per_conversation: turns of one conversation speaking or queued behind the
            speaking one; `speak()` beyond raises `AdmissionError`.
        max_context_rows: context budget per conversation; older turns are trimmed beyond it.
        context_trim_target: after a trim the history fits in this fraction of the budget, so a
            long dialogue rebuilds its cache rarely instead of at every turn.
        max_frames_per_turn: hard cap on frames (80 ms each) of one assistant turn.
        max_text_chars: characters one turn accepts; `push_text` beyond raises `TextTooLongError`.
        max_batch: frames generated per tick (decode rows plus first frames of new turns).
        prefill_chunk: prompt rows prefilled per tick over all new turns, so a long prompt never
            stalls streams that are already speaking.
        lead_s: a stream never gets more than this many seconds of audio ahead of real-time
            playback (None: no cap, for capacity measurements and offline rendering).
        first_chunk_frames: frames in the first chunk of a turn (time to first audio).
        chunk_frames: frames in later chunks. Chunks ramp up to it (never more frames than
            already delivered: 1, 1, 2, 4, ...) so a listener who starts playing at the first
            chunk does not run dry while a bigger chunk fills; a chunk is also cut early when
            the listener's audio would end before the rest of it arrives at real-time speed
            (near full load, when frames come barely faster than they play).
        kv_block_size: rows per KV block.
        kv_num_blocks: KV blocks in the shared pool (None: enough for `max_conversations`
            conversations of `kv_rows_per_conversation` rows each, and on CUDA at most
            `kv_memory_fraction` of the memory free after loading). Idle conversations' caches
            are evicted (and later rebuilt from their rows) when the pool runs low.
        kv_rows_per_conversation: typical context used to size the pool when `kv_num_blocks`
            is None; conversations may grow beyond it while others are shorter.
        kv_memory_fraction: share of free device memory the pool may take (CUDA only).
        text_timeout_s: a turn that waits this long for more text (no delta and no
            `end_text()`) fails with `StreamFailed` (cause `TimeoutError`), so a forgotten stream
            cannot hold a slot forever (None: wait indefinitely).
        idle_wait_s: longest sleep of the scheduler thread when nothing is runnable.
        prefix_cache_voices: voices whose system+voice prefix KV is kept in the pool, prefilled
            once and forked by every conversation with that voice (least recently used voices
            go first; entries are also evicted when the pool runs low). 0 disables sharing:
            each conversation prefills its own prefix.
        max_user_audio_s: longest user audio `add_user_turn` accepts (checked from the array's
            shape or the file's header before anything is decoded; `InvalidAudioError` beyond).
            60 s is twice what the Pipecat and LiveKit plugins capture per turn (30 s), and 750
            context rows; without a cap one call could queue an hour of decoding and encoding
            on the engine thread.
        kv_wait_s: longest time a turn waits to start while the KV pool cannot hold it beside
            the turns already speaking (each keeps room for its whole turn, so a running turn
            never fails for memory; idle conversations' caches are evicted, never waited for);
            then it ends with `CapacityError` (retryable) before any audio.
        cuttable_turns: finished turns per conversation that `TurnStream.mark_played` can
            still cut (a reply spoken as several turns is heard after all are generated; a
            plugin keeps at most this many of its own for a late barge-in).
        compile_step: on the CPU, run each frame's 16 depth steps with their draws as one
            `torch.compile`d graph (any batch; a fallback graph per step for streams the
            top-k draw cannot serve) and the codec step as another, compiled at engine start
            (the time is `Engine.warmup_s`); the eager step's codes up to float rounding, its
            audio within one int16 step. Off by default: the compile takes ~45 s the first
            time on a 2-core machine (~11 s once inductor's on-disk cache holds it), which
            tests and short CPU demos do not win back. No effect on CUDA.
    """

    max_streams: int = 16
    max_conversations: int = 64
    max_turns_per_conversation: int = 8
    max_context_rows: int = 32768
    context_trim_target: float = 0.75
    max_frames_per_turn: int = 1500
    max_text_chars: int = 20_000
    max_batch: int = 64
    prefill_chunk: int = 512
    lead_s: float | None = 1.5
    first_chunk_frames: int = 1
    chunk_frames: int = 3
    kv_block_size: int = 64
    kv_num_blocks: int | None = None
    kv_rows_per_conversation: int = 2048
    kv_memory_fraction: float = 0.5
    text_timeout_s: float | None = 120.0
    idle_wait_s: float = 0.05
    prefix_cache_voices: int = 32
    max_user_audio_s: float = 60.0
    kv_wait_s: float = 5.0
    cuttable_turns: int = 8
    compile_step: bool = False

    def __post_init__(self) -> None:
        positive = (
            "max_streams", "max_conversations", "max_turns_per_conversation",
            "max_context_rows", "max_frames_per_turn",
            "max_text_chars", "max_batch", "prefill_chunk", "first_chunk_frames",
            "chunk_frames", "kv_block_size", "kv_rows_per_conversation", "cuttable_turns",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive int, got {value!r}")
        if self.kv_num_blocks is not None and self.kv_num_blocks <= 0:
            raise ValueError(f"EngineConfig.kv_num_blocks must be positive, got {self.kv_num_blocks}")
        if self.lead_s is not None and not self.lead_s > 0:
            raise ValueError(f"EngineConfig.lead_s must be > 0 or None, got {self.lead_s!r}")
        if not 0.0 < self.context_trim_target <= 1.0:
            raise ValueError(
                f"EngineConfig.context_trim_target must be in (0, 1], got {self.context_trim_target}"
            )
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(
                f"EngineConfig.kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}"
            )
        if self.text_timeout_s is not None and not self.text_timeout_s > 0:
            raise ValueError(f"EngineConfig.text_timeout_s must be > 0 or None, got "
                             f"{self.text_timeout_s!r}")
        if (not isinstance(self.prefix_cache_voices, int) or isinstance(self.prefix_cache_voices, bool)
                or self.prefix_cache_voices < 0):
            raise ValueError(f"EngineConfig.prefix_cache_voices must be an int >= 0, got "
                             f"{self.prefix_cache_voices!r}")
        if not self.idle_wait_s > 0:
            raise ValueError(f"EngineConfig.idle_wait_s must be > 0, got {self.idle_wait_s}")
        limit = self.max_user_audio_s
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not 0 < limit < math.inf:
            raise ValueError(f"EngineConfig.max_user_audio_s must be a finite number of seconds "
                             f"> 0, got {limit!r}")
        if isinstance(self.kv_wait_s, bool) or not 0 <= self.kv_wait_s < math.inf:
            raise ValueError(f"EngineConfig.kv_wait_s must be a finite number >= 0, got "
                             f"{self.kv_wait_s!r}")

    def kv_pool_blocks(self, device_blocks: int | None = None) -> int:
        """Blocks of the shared KV pool: `kv_num_blocks` when set, else enough for
        `max_conversations` conversations of `kv_rows_per_conversation` rows, at most
        `device_blocks` (what `kv_memory_fraction` of the free device memory holds)."""
        if self.kv_num_blocks is not None:
            return self.kv_num_blocks
        blocks = -(-self.kv_rows_per_conversation // self.kv_block_size) * self.max_conversations
        return blocks if device_blocks is None else max(1, min(blocks, device_blocks))
