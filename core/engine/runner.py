"""ModelRunner: one tick's rows -> one backbone call, one depth pass, one codec decode step.

All active streams share each call: prefill chunks and 1-row decode steps go into one varlen
`forward_rows`, every stream that needs a frame is sampled in one 16-codebook depth pass, and
every real frame is decoded in one batched `decode_step`. Per-stream device state (sampler
history and random counter, codec ring caches) lives in slots; a new turn resets its slot.

A frame with a special code (EOS 1026 on codebook 0, or a pad/BOS/EOS id sampled on any
codebook) is not decoded: the codec has no such codes, and upstream's decoder stops at the
first such frame, so the engine ends the turn there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.codec import MossAudioCodec
from core.codec.streaming import CodecDecodeState
from core.model import KVPool, MossTTSRealtime, SamplerBatch, SamplingParams

MAX_REPETITION_WINDOW = 256


@dataclass(slots=True)
class RowWork:
    """Rows to append to one sequence; `slot` set when its last row's hidden is sampled."""

    seq_id: int
    rows: Tensor  # Long[T, 17]
    slot: int | None


@dataclass(slots=True)
class StepOutput:
    """Results for the sampled items of a tick, in the order of the sampled `RowWork`s."""

    codes: Tensor  # Long[S, 16] on CPU
    pcm: list[Tensor | None]  # Float[1920] per sampled item, None for EOS / special codes
    logits: Tensor | None = None  # [S, 16, V] raw depth logits, only when asked for (tests)


@dataclass(slots=True)
class _SlotSnapshot:
    slots: Tensor
    sampler: dict[str, Tensor]
    codec_frames: Tensor


class ModelRunner:
    """Owns the model, codec, KV pool and per-slot device state; used by the engine thread."""

    def __init__(self, model: MossTTSRealtime, codec: MossAudioCodec, kv: KVPool, *,
                 num_slots: int) -> None:
        self.model, self.codec, self.kv = model, codec, kv
        cfg = model.config
        self.device = model.device
        self.rvq = cfg.rvq
        self.pad_code = cfg.audio_pad_code
        self.sampler = SamplerBatch(num_slots, device=self.device, rvq=cfg.rvq,
                                    max_window=MAX_REPETITION_WINDOW)
        self.codec_state: CodecDecodeState = codec.init_decode_state(num_slots)

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
        slots = torch.tensor([work[i].slot for i in sel], dtype=torch.long)
        logits = None
        if want_logits:
            vocab = self.model.config.audio_vocab_size
            logits = torch.empty(len(sel), self.rvq, vocab, device=self.device,
                                 dtype=torch.promote_types(self.model.dtype, torch.float32))
        codes = self.model.sample_frame(hidden[sel], self.sampler, slots=slots.to(self.device),
                                        logits_out=logits)
        codes_cpu = codes.cpu()
        valid = (codes_cpu < self.pad_code).all(dim=1)
        pcm: list[Tensor | None] = [None] * len(sel)
        if bool(valid.any()):
            idx = valid.nonzero().flatten()
            idx = idx[slots[idx].argsort()]  # ascending slots: the codec's contiguous fast path
            wave = self.codec.decode_step(codes[idx.to(codes.device)], slots[idx], self.codec_state)
            wave = wave.float().cpu()
            for j, i in enumerate(idx.tolist()):
                pcm[i] = wave[j]
        return StepOutput(codes_cpu, pcm, None if logits is None else logits.cpu())

    def snapshot(self, slots: list[int]) -> _SlotSnapshot:
        """Per-slot state a failed tick may have advanced (sampler history/counters, codec
        positions; ring caches are rewritten at the same positions on a retry)."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        size = self.sampler.size  # every per-row tensor (history, counters, params)
        saved = {name: value.index_select(0, idx).clone()
                 for name, value in vars(self.sampler).items()
                 if isinstance(value, Tensor) and value.dim() and value.shape[0] == size}
        frames = self.codec_state.frames
        return _SlotSnapshot(idx, saved, frames.index_select(0, idx.to(frames.device)).clone())

    def restore(self, snap: _SlotSnapshot) -> None:
        for name, value in snap.sampler.items():
            getattr(self.sampler, name).index_copy_(0, snap.slots, value)
        frames = self.codec_state.frames
        frames.index_copy_(0, snap.slots.to(frames.device), snap.codec_frames)
