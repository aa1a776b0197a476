"""CompiledDecode: the codec's streaming decode step as one compiled graph (CPU, inductor).

On the tiny checkpoint `decode_step` is ~1.7 ms of host overhead per tick (some 300 small ops
over 4 stages); one inductor graph runs it in ~0.6 ms (one stream; 2.5 -> 1.1 ms at 16). The
batch is a dynamic dimension, so one graph serves every batch from 2 rows up; a lone row is
decoded as two copies of itself (the same values written twice to the same ring entries), so
there is no second graph for batch 1 and no compile after warm-up. Slots are gathered, never sliced (one graph for any slot set).
`MossAudioCodec.decode_step` stays the reference, the path on other devices and for any other
number of codebooks than the one compiled.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from core.codec.codec import MossAudioCodec
from core.codec.streaming import CodecDecodeState, SlotState
from core.device import at_least_two_rows, compile_step

log = logging.getLogger("core.codec")


def _decode_rows(
    codec: MossAudioCodec, codes: Tensor, slots: Tensor, frames: Tensor, stages: list[SlotState]
) -> Tensor:
    return codec.decode_rows(codes, slots, frames, stages)


class CompiledDecode:
    """`codec.decode_step(codes, slots, state)` with the same checks and results, compiled."""

    def __init__(self, codec: MossAudioCodec, n_quantizers: int) -> None:
        self.codec, self.n_quantizers = codec, n_quantizers
        self._rows = compile_step(_decode_rows, dynamic=None, cpp_wrapper=True)  # batch: dynamic
        self.warmup_s = 0.0

    @torch.inference_mode()
    def warm_up(self, state: CodecDecodeState) -> float:
        """Compile on two dummy rows of slot 0; its rings are reset afterwards."""
        t0 = time.perf_counter()
        slot0 = torch.zeros(1, dtype=torch.long, device=state.frames.device)
        codes = torch.zeros(2, self.n_quantizers, dtype=torch.long, device=state.frames.device)
        slots = slot0.repeat(2)
        frames = torch.zeros_like(slots)
        for t in (codes, slots, frames):
            torch._dynamo.mark_dynamic(t, 0)
        self._rows(self.codec, codes, slots, frames, state.stages)
        state.reset(slot0)
        self.warmup_s = time.perf_counter() - t0
        log.info("codec decode step compiled in %.1f s", self.warmup_s)
        return self.warmup_s

    @torch.inference_mode()
    def __call__(self, codes: Tensor, slots: Tensor, state: CodecDecodeState) -> Tensor:
        codec = self.codec
        if codes.dim() != 2 or codes.shape[1] != self.n_quantizers:  # not the compiled shape
            return codec.decode_step(codes, slots, state)
        slots = codec.check_step(codes, slots, state)[0]
        n = codes.shape[0]
        slots = slots.clone()  # an inference tensor, contiguous: what the graph's guards saw
        rows, batch = at_least_two_rows(slots, codes)
        wave = self._rows(codec, batch, rows, state.frames.index_select(0, rows), state.stages)
        state.frames.index_add_(0, slots, torch.ones_like(slots))
        return wave[:n]
