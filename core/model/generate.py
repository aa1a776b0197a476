"""Single-conversation reference loop for one assistant turn (tests, parity, documentation).

The engine does the same thing batched; this loop is the readable statement of the schedule:
prefill the turn's prompt rows plus the text lead (min(12, L) tokens, BOS on the last lead row;
the builder decides what an empty text leads with) -> frame 0; then one backbone step per
remaining text token, then `<|text_pad|>` steps until codebook 0 samples EOS or `max_frames`
audio frames exist. The last sampled frame (EOS, or the capped one) is not fed back, so the KV
cache ends at the row that produced it, and the next turn only prefills its new rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from core.model.kv_cache import KVPool
from core.model.moss import MossTTSRealtime
from core.model.sampling import SamplerBatch, SamplingParams
from core.prompt import DELAY


class RowBuilder(Protocol):
    """The part of `core.prompt.PromptBuilder` the loop needs."""

    def prefill_rows(self, text_ids: Sequence[int]) -> Tensor: ...

    def step_row(self, text_id: int | None, frame: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class TurnResult:
    """One assistant turn: its audio frames and what went into the KV cache."""

    frames: Tensor  # Long[F, 16] real audio frames (the EOS frame is not included)
    eos: bool  # True when codebook 0 sampled EOS; False when the frame cap stopped the turn
    rows: Tensor  # Long[R, 17] every row appended to the KV cache during this turn
    text_consumed: int  # text tokens fed (the rest is dropped when EOS comes early)


@torch.inference_mode()
def generate_turn(
    model: MossTTSRealtime,
    kv: KVPool,
    seq_id: int,
    prompt_rows: Tensor,
    text_ids: Sequence[int],
    sampling: SamplingParams | SamplerBatch,
    *,
    max_frames: int,
    builder: RowBuilder,
) -> TurnResult:
    """Generate one assistant turn on top of `seq_id`'s KV cache (kept for the next turn).

    `sampling` is either params (a fresh one-row sampler) or a one-row `SamplerBatch` whose
    random counter continues across turns; its repetition history is reset here either way.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    sampler = (
        sampling
        if isinstance(sampling, SamplerBatch)
        else SamplerBatch.from_params([sampling], device=model.device, rvq=model.config.rvq)
    )
    assert sampler.size == 1, "generate_turn drives exactly one conversation"
    sampler.new_turn(0)
    eos_code = model.config.audio_eos_code
    lead = min(DELAY, len(text_ids))
    rows = torch.cat(
        [prompt_rows.to(torch.long).cpu(), builder.prefill_rows(list(text_ids[:lead]))]
    )
    fed = [rows]
    hidden = model.forward_rows([rows], [seq_id], kv)
    frames: list[Tensor] = []
    next_text = lead
    eos = False
    while True:
        frame = model.sample_frame(hidden, sampler)[0].cpu()
        if int(frame[0]) == eos_code:
            eos = True
            break
        frames.append(frame)
        if len(frames) >= max_frames:
            break
        text_id = text_ids[next_text] if next_text < len(text_ids) else None
        next_text += text_id is not None
        row = builder.step_row(text_id, frame)
        fed.append(row)
        hidden = model.forward_rows([row], [seq_id], kv)
    empty = torch.empty(0, model.config.rvq, dtype=torch.long)
    return TurnResult(
        frames=torch.stack(frames) if frames else empty,
        eos=eos,
        rows=torch.cat(fed),
        text_consumed=next_text,
    )
