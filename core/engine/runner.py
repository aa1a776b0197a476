"""ModelRunner: one tick's rows -> one backbone call, one depth pass, one codec decode step.

All active streams share each call: prefill chunks and 1-row decode steps go into one varlen
`forward_rows`, every stream that needs a frame is sampled in one 16-codebook depth pass, and
every real frame is decoded in one batched `decode_step`. The depth pass and its draws are the
`FrameStep` (eager, or one compiled graph per frame on the CPU: `EngineConfig.compile_step`),
and so is the codec step (`core.codec.compiled`).
Per-stream device state (sampler history and random counter, codec ring caches) lives in slots;
a new turn resets its slot.

A frame with a special code (EOS 1026 on codebook 0, or a pad/BOS/EOS id sampled on any
codebook) is not decoded: the codec has no such codes, and upstream's decoder stops at the
first such frame, so the engine ends the turn there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from core.codec import MossAudioCodec
from core.codec.compiled import CompiledDecode
from core.codec.streaming import CodecDecodeState
from core.model import KVPool, MossTTSRealtime, SamplerBatch
from core.model.frame_step import FrameStep, make_frame_step
from core.values import MAX_REPETITION_WINDOW, SamplingParams


@dataclass(slots=True)
class RowWork:
    """Rows to append to one sequence; `slot` set when its last row's hidden is sampled."""

    seq_id: int
    rows: Tensor  # Long[T, 17]
    slot: int | None


@dataclass(frozen=True, slots=True)
class FrameAudio:
    """One decoded frame as the stream delivers it: int16 PCM and its RMS (for word timings)."""

    pcm16: bytes  # little-endian int16, 1920 samples
    energy: float  # RMS of the float samples, computed in float64


@dataclass(slots=True)
class StepOutput:
    """Results for the sampled items of a tick, in the order of the sampled `RowWork`s."""

    codes: Tensor  # Long[S, 16] on CPU
    audio: list[FrameAudio | None]  # per sampled item, None for EOS / special codes
    logits: Tensor | None = None  # [S, 16, V] raw depth logits, only when asked for (tests)


@dataclass(slots=True)
class _SlotSnapshot:
    slots: Tensor
    sampler: dict[str, Tensor]
    codec_frames: Tensor


def frame_audio(wave: np.ndarray) -> list[FrameAudio]:
    """Float[N, 1920] -> one `FrameAudio` per row, converted for the whole tick at once (the
    same elementwise int16 rounding and per-row float64 RMS a per-stream conversion gives)."""
    pcm16 = (np.clip(wave, -1.0, 1.0) * 32767.0).round().astype("<i2")
    energy = np.sqrt(np.mean(np.square(wave.astype(np.float64)), axis=1)).tolist()
    return [FrameAudio(row.tobytes(), e) for row, e in zip(pcm16, energy, strict=True)]


class ModelRunner:
    """Owns the model, codec, KV pool and per-slot device state; used by the engine thread."""

    def __init__(self, model: MossTTSRealtime, codec: MossAudioCodec, kv: KVPool, *,
                 num_slots: int, compile_step: bool = False) -> None:
        self.model, self.codec, self.kv = model, codec, kv
        cfg = model.config
        self.device = model.device
        self.rvq = cfg.rvq
        self.pad_code = cfg.audio_pad_code
        self.sampler = SamplerBatch(num_slots, device=self.device, rvq=cfg.rvq,
                                    max_window=MAX_REPETITION_WINDOW)
        self.codec_state: CodecDecodeState = codec.init_decode_state(num_slots)
        # At most one sampled row per slot and tick: the compiled step serves up to num_slots.
        self.frame_step: FrameStep = make_frame_step(model, self.sampler, num_slots,
                                                     compile_step=compile_step)
        self.decode: Callable[[Tensor, Tensor, CodecDecodeState], Tensor] = codec.decode_step
        if compile_step and self.device.type == "cpu":
            self.decode = CompiledDecode(codec, cfg.rvq)

    def warm_up(self) -> float:
        """Compile what is compiled (nothing on the eager path); returns the seconds it took."""
        seconds = self.frame_step.warm_up()
        if isinstance(self.decode, CompiledDecode):
            seconds += self.decode.warm_up(self.codec_state)
        return seconds

    def start_turn(self, slot: int, params: SamplingParams, counter: int) -> None:
        """Reset a slot for a new turn: sampler params/history (random counter continues from
        the conversation's `counter`) and the codec's streaming state (one context per turn)."""
        self.sampler.reset(slot, params, counter=counter)
        self.codec_state.reset(torch.tensor([slot], device=self.codec_state.frames.device))

    def counter(self, slot: int) -> int:
        """Frames drawn by this slot's conversation so far (kept across its turns)."""
        return int(self.sampler.counter[slot])

    @torch.inference_mode()
    def step(self, work: list[RowWork], *, want_logits: bool = False) -> StepOutput:
        """Run one tick. On an exception nothing observable has changed except KV lengths,
        which the caller rolls back (see `snapshot` / `restore` for the slot state)."""
        assert work, "empty tick"
        hidden = self.model.forward_rows([w.rows for w in work], [w.seq_id for w in work], self.kv)
        sel = [i for i, w in enumerate(work) if w.slot is not None]
        if not sel:
            return StepOutput(torch.zeros(0, self.rvq, dtype=torch.long), [])
        slot_ids = [work[i].slot for i in sel]
        slots = torch.tensor(slot_ids, dtype=torch.long)
        logits = None
        if want_logits:
            vocab = self.model.config.audio_vocab_size
            logits = torch.empty(len(sel), self.rvq, vocab, device=self.device,
                                 dtype=torch.promote_types(self.model.dtype, torch.float32))
        if len(sel) < len(work):
            hidden = hidden[sel]
        codes = self.frame_step(hidden, slots.to(self.device), logits_out=logits)
        codes_cpu = codes.cpu()
        valid = (codes_cpu < self.pad_code).all(dim=1)
        audio: list[FrameAudio | None] = [None] * len(sel)
        if bool(valid.all()) and slot_ids == sorted(slot_ids):  # the usual tick: no reorder
            wave = self.decode(codes, slots, self.codec_state)
            audio = frame_audio(wave.float().cpu().numpy())
        elif bool(valid.any()):
            idx = valid.nonzero().flatten()
            idx = idx[slots[idx].argsort()]  # ascending slots: the codec's contiguous fast path
            wave = self.decode(codes[idx.to(codes.device)], slots[idx], self.codec_state)
            for i, frame in zip(idx.tolist(), frame_audio(wave.float().cpu().numpy()), strict=True):
                audio[i] = frame
        return StepOutput(codes_cpu, audio, None if logits is None else logits.cpu())

    def snapshot(self, slots: list[int]) -> _SlotSnapshot:
        """Per-slot state a failed tick may have advanced (what `SamplerBatch.commit` writes,
        codec positions; ring caches are rewritten at the same positions on a retry)."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        frames = self.codec_state.frames
        return _SlotSnapshot(idx, self.sampler.save_rows(idx),
                             frames.index_select(0, idx.to(frames.device)))

    def restore(self, snap: _SlotSnapshot) -> None:
        self.sampler.restore_rows(snap.slots, snap.sampler)
        frames = self.codec_state.frames
        frames.index_copy_(0, snap.slots.to(frames.device), snap.codec_frames)
