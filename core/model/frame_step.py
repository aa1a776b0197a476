"""FrameStep: a frame's work after the backbone (16 depth steps and their draws), eager or
compiled per batch bucket.

On the tiny checkpoint almost all of a frame is host overhead: one operator dispatch per small
op, some 40 per depth step. `CompiledFrameStep` (CPU, inductor) runs each depth step as one
compiled graph with fixed shapes: the codebook is a tensor (rope, head and frame-cache position
picked by index), the frame cache holds all 16 positions (later ones masked), and the batch is
padded to a bucket (1, 2, 4, ... 64). Batches below the sampler's fast path (1 and 2 rows) draw
inside the graph too (the static full-sort draw); larger ones take the sampler's exact numpy
fast path on the graph's logits, which a compiled full sort is slower than (measured).

Padding rows get a zero hidden state and read the sampler rows of the first real slot; their
codes are dropped and only real rows are committed, so they never touch a slot's state. The
eager step (`MossTTSRealtime.sample_frame`) stays the reference and the path for CUDA (where
the seam for CUDA graphs is the same per-bucket step) and for logits tracing. Both read and
advance the same sampler state, so a tick may take either.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from core.model.depth import Depth
from core.model.moss import MossTTSRealtime
from core.model.sampling import FrameDraw, SamplerBatch

log = logging.getLogger("core.model")

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def buckets_for(max_rows: int) -> tuple[int, ...]:
    """The buckets that batches of 1..max_rows rows pad to (beyond 64: the eager step)."""
    larger = [b for b in BUCKETS if b >= max_rows]
    return tuple(b for b in BUCKETS if b < max_rows) + tuple(larger[:1])


class FrameStep:
    """The eager frame step: `sample_frame` as it is (any device, any batch)."""

    def __init__(self, model: MossTTSRealtime, sampler: SamplerBatch) -> None:
        self.model, self.sampler = model, sampler
        self.warmup_s = 0.0

    def warm_up(self) -> float:
        """Prepare every bucket before the first live frame; returns the seconds it took."""
        return self.warmup_s

    def __call__(self, hidden: Tensor, slots: Tensor, logits_out: Tensor | None = None) -> Tensor:
        """hidden [B, D] of sampler rows `slots` -> codes Long[B, 16]; the rows advance a frame."""
        return self.model.sample_frame(hidden, self.sampler, slots=slots, logits_out=logits_out)


def _step_draw(
    depth: Depth, x: Tensor, k: Tensor, v: Tensor, codebook: Tensor,
    rope: tuple[Tensor, Tensor], frame: FrameDraw,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One depth step and its draw: (codes [B], next input, k, v)."""
    logits, k, v = depth.codebook_step(x, k, v, codebook, rope)
    codes = SamplerBatch.draw(logits, 0, frame.codebook(codebook))
    return codes, depth.embed_code(codes, codebook), k, v


def _step_logits(
    depth: Depth, x: Tensor, k: Tensor, v: Tensor, codebook: Tensor, rope: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """One depth step: (logits [B, V], k, v)."""
    return depth.codebook_step(x, k, v, codebook, rope)


class CompiledFrameStep(FrameStep):
    """Depth steps compiled (torch.compile, inductor) per bucket up to `max_rows` rows; CPU."""

    def __init__(self, model: MossTTSRealtime, sampler: SamplerBatch, max_rows: int) -> None:
        super().__init__(model, sampler)
        self.buckets = buckets_for(max_rows)
        self.device, self.dtype = model.device, model.dtype
        self.vocab = model.config.audio_vocab_size
        self.logits_dtype = torch.promote_types(self.dtype, torch.float32)
        self.rope = model.depth.rope_table(self.device, self.dtype)  # built outside any trace
        with torch.inference_mode(False):
            self.codebooks = [torch.tensor([i], device=self.device) for i in range(model.config.rvq)]
        # Every bucket is its own graph; each function keeps one per bucket it serves.
        self._draw = torch.compile(_step_draw, fullgraph=True, dynamic=False)
        self._logits = torch.compile(_step_logits, fullgraph=True, dynamic=False)

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile every bucket on a dummy frame (slot 0's state is read, nothing committed)."""
        t0 = time.perf_counter()
        for bucket in self.buckets:
            hidden = torch.zeros(bucket, self.model.config.hidden_size, device=self.device,
                                 dtype=self.dtype)
            self._codes(hidden, torch.zeros(bucket, dtype=torch.long, device=self.device), bucket)
        self.warmup_s = time.perf_counter() - t0
        log.info("frame step compiled for buckets %s in %.1f s", self.buckets, self.warmup_s)
        return self.warmup_s

    def __call__(self, hidden: Tensor, slots: Tensor, logits_out: Tensor | None = None) -> Tensor:
        n = hidden.shape[0]
        bucket = next((b for b in self.buckets if b >= n), None)
        if logits_out is not None or bucket is None:
            return super().__call__(hidden, slots, logits_out)
        idx = self.sampler.rows(slots, n)
        codes = self._codes(hidden.to(self.dtype), idx, bucket)
        self.sampler.commit(codes, idx)
        return codes

    def _codes(self, hidden: Tensor, idx: Tensor, bucket: int) -> Tensor:
        """Codes [n, 16] of the real rows; the batch padded to `bucket` inside."""
        n = hidden.shape[0]
        pad = bucket - n
        x = F.pad(hidden, (0, 0, 0, pad))
        k = self.model.depth.empty_cache(bucket, self.device, self.dtype)
        v = torch.zeros_like(k)
        depth, rope = self.model.depth, self.rope
        codes = torch.empty(n, len(self.codebooks), dtype=torch.long, device=self.device)
        if bucket < self.sampler.fast_path_min_rows:
            padded = torch.cat([idx, idx[:1].expand(pad)])  # padding reads row 0's state
            frame = self.sampler.prepare(padded, self.vocab, self.logits_dtype, static=True)
            for i, cb in enumerate(self.codebooks):
                step, x, k, v = self._draw(depth, x, k, v, cb, rope, frame)
                codes[:, i] = step[:n]
            return codes
        frame = self.sampler.prepare(idx, self.vocab, self.logits_dtype)
        for i, cb in enumerate(self.codebooks):
            logits, k, v = self._logits(depth, x, k, v, cb, rope)
            codes[:, i] = SamplerBatch.draw(logits[:n], i, frame)
            if i + 1 < len(self.codebooks):
                x = depth.embed_code(F.pad(codes[:, i], (0, pad)), cb)
        return codes


def make_frame_step(
    model: MossTTSRealtime, sampler: SamplerBatch, max_rows: int, *, compile_step: bool
) -> FrameStep:
    """The compiled step on the CPU when asked for, else the eager one (CUDA: eager for now)."""
    if compile_step and model.device.type == "cpu":
        return CompiledFrameStep(model, sampler, max_rows)
    return FrameStep(model, sampler)
