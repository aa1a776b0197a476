"""FrameStep: a frame's work after the backbone (16 depth steps and their draws), eager or
compiled.

On the tiny checkpoint almost all of a frame is host overhead: one operator dispatch per small
op, some 40 per depth step, and on top of that one compiled call per step costs ~100 us (guards,
wrappers). `CompiledFrameStep` (CPU, inductor) therefore runs the whole frame as one graph: the
16 depth steps are a `scan` over (codebook, head) with the frame cache as its carry, the codebook
a tensor (rope and cache position picked by index), the frame cache holding all 16 positions
(later ones masked), and each step's draw inside: the sampler's top-k draw over 64 candidates
(`SamplerBatch.draw_top`, no full-vocab sort). One graph serves every batch (the batch is a
dynamic dimension; a lone row runs as two copies of itself, so there is no graph for batch 1).

Rows the top-k graph does not serve (sampled without top-k or with top_k above 56, or with ties
at the k-th value that run past the candidates: ~never) are redrawn alone by the fallback: one
compiled graph per depth step (same dynamic batch) and the sampler's exact host draw on its
logits. So which path a row takes depends on that row alone, never on the rows beside it. The
eager step (`MossTTSRealtime.sample_frame`) stays the reference and the path for CUDA and for
logits tracing. All read and advance the same sampler state, so a tick may take any of them; only
real rows are committed (the copy of a lone row is dropped). Codes equal the eager step's up to
float rounding: the compiled graphs round their sums differently, so a code decided within
rounding (a near tie; a cumulative probability within an ulp of 1 - top_p) may differ (the tests,
which compare codes over many frames, see none).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import Tensor

from core.device import at_least_two_rows, compile_step
from core.model.depth import Depth
from core.model.moss import MossTTSRealtime
from core.model.sampling import FrameDraw, SamplerBatch

try:  # a prototype operator of torch; where it is missing, every frame runs step by step
    from torch._higher_order_ops.scan import scan
except ImportError:  # pragma: no cover - older torch
    scan = None

log = logging.getLogger("core.model")

# Candidates of the compiled top-k draw: top_k up to TOP_WIDTH - 8 (the tie margin) is served.
TOP_WIDTH = 64


class FrameStep:
    """The eager frame step: `sample_frame` as it is (any device, any batch)."""

    def __init__(self, model: MossTTSRealtime, sampler: SamplerBatch) -> None:
        self.model, self.sampler = model, sampler
        self.warmup_s = 0.0

    def warm_up(self) -> float:
        """Compile what is compiled before the first live frame; returns the seconds it took."""
        return self.warmup_s

    def __call__(self, hidden: Tensor, slots: Tensor, logits_out: Tensor | None = None) -> Tensor:
        """hidden [B, D] of sampler rows `slots` -> codes Long[B, 16]; the rows advance a frame."""
        return self.model.sample_frame(hidden, self.sampler, slots=slots, logits_out=logits_out)


def _frame_top(
    depth: Depth, x: Tensor, k: Tensor, v: Tensor, codebooks: Tensor,
    rope: tuple[Tensor, Tensor], heads: Tensor, frame: FrameDraw,
) -> tuple[Tensor, Tensor]:
    """The 16 depth steps and their top-k draws: (codes [B, 16], ok [B])."""

    def step(carry: tuple[Tensor, Tensor, Tensor], xs: tuple[Tensor, Tensor]):
        x, k, v = carry
        codebook, head = xs
        logits, k, v = depth.codebook_step(x, k, v, codebook, rope, head)
        codes, ok = SamplerBatch.draw_top(logits, frame.codebook(codebook), TOP_WIDTH)
        return (depth.embed_code(codes, codebook), k, v), (codes, ok)

    _, (codes, ok) = scan(step, (x, k, v), (codebooks, heads))
    return codes.transpose(0, 1).contiguous(), ok.all(dim=0)


def _step_logits(
    depth: Depth, x: Tensor, k: Tensor, v: Tensor, codebook: Tensor,
    rope: tuple[Tensor, Tensor], head: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One depth step: (logits [B, V], k, v)."""
    return depth.codebook_step(x, k, v, codebook, rope, head)


def _mark_batch(*tensors: Tensor, dim: int = 0) -> None:
    for t in tensors:
        torch._dynamo.mark_dynamic(t, dim)


class CompiledFrameStep(FrameStep):
    """The frame compiled (torch.compile, inductor) for batches up to `max_rows` rows; CPU."""

    def __init__(self, model: MossTTSRealtime, sampler: SamplerBatch, max_rows: int) -> None:
        super().__init__(model, sampler)
        self.max_rows = max_rows
        self.device, self.dtype = model.device, model.dtype
        self.vocab = model.config.audio_vocab_size
        self.logits_dtype = torch.promote_types(self.dtype, torch.float32)
        self.rope = model.depth.rope_table(self.device, self.dtype)  # built outside any trace
        rvq = model.config.rvq
        with torch.inference_mode(False):
            self.codebook_ids = torch.arange(rvq, device=self.device).view(rvq, 1)
            self.codebooks = list(self.codebook_ids.unbind(0))
        with torch.inference_mode():  # views, made once (as every step would make them)
            self.heads = model.depth.heads.detach()
            self.head_views = self.heads.unbind(0)
        self._top = None if scan is None else compile_step(_frame_top, dynamic=None,
                                                            cpp_wrapper=True)
        if self._top is None:
            log.warning("torch %s has no scan operator: the compiled frame runs step by step",
                        torch.__version__)
        self._logits = compile_step(_step_logits, dynamic=None)
        self.fallbacks = 0  # frames with rows the top-k graph did not serve

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile both graphs on a dummy 2-row frame of slot 0 (read, nothing committed)."""
        t0 = time.perf_counter()
        hidden = torch.zeros(2, self.model.config.hidden_size, device=self.device, dtype=self.dtype)
        rows = torch.zeros(2, dtype=torch.long, device=self.device)
        if self._top is not None:
            self._codes_top(hidden, rows, warm=True)
        self._codes_stepwise(hidden, rows, warm=True)
        self.warmup_s = time.perf_counter() - t0
        log.info("frame step compiled in %.1f s", self.warmup_s)
        return self.warmup_s

    def __call__(self, hidden: Tensor, slots: Tensor, logits_out: Tensor | None = None) -> Tensor:
        n = hidden.shape[0]
        if logits_out is not None or n > self.max_rows:
            return super().__call__(hidden, slots, logits_out)
        idx = self.sampler.rows(slots, n)
        hidden = hidden.to(self.dtype)
        served = np.zeros(n, dtype=bool)
        if self._top is not None:
            served = self.sampler.top_fits(idx, TOP_WIDTH)
        codes = None
        if served.any():
            codes, ok = self._codes_top(*at_least_two_rows(hidden, idx))
            codes = codes[:n]
            served &= ok[:n].numpy()
        if not served.all():  # the other rows redrawn alone: a row's path is its own
            self.fallbacks += 1
            if codes is None:
                codes = self._codes_stepwise(*at_least_two_rows(hidden, idx))[:n]
            else:
                rest = torch.from_numpy(np.flatnonzero(~served))
                redrawn = self._codes_stepwise(*at_least_two_rows(hidden[rest], idx[rest]))
                codes = codes.clone()
                codes[rest] = redrawn[: rest.shape[0]]
        self.sampler.commit(codes, idx)
        return codes

    def _caches(self, rows: int) -> tuple[Tensor, Tensor]:
        k = self.model.depth.empty_cache(rows, self.device, self.dtype)
        return k, torch.zeros_like(k)

    def _codes_top(self, x: Tensor, rows: Tensor, *, warm: bool = False
                   ) -> tuple[Tensor, Tensor]:
        assert self._top is not None
        k, v = self._caches(x.shape[0])
        frame = self.sampler.prepare(rows, self.vocab, self.logits_dtype, static=True)
        if warm:
            _mark_batch(x, frame.history, frame.penalty, frame.divisor, frame.greedy, frame.top_k,
                        frame.one_minus_top_p, frame.keys)
            _mark_batch(k, v, dim=1)
        return self._top(self.model.depth, x, k, v, self.codebook_ids, self.rope, self.heads,
                         frame)

    def _codes_stepwise(self, x: Tensor, rows: Tensor, *, warm: bool = False) -> Tensor:
        k, v = self._caches(x.shape[0])
        if warm:
            _mark_batch(x)
            _mark_batch(k, v, dim=1)
        depth, codes = self.model.depth, []
        frame = self.sampler.prepare(rows, self.vocab, self.logits_dtype)
        for i, (cb, head) in enumerate(zip(self.codebooks, self.head_views, strict=True)):
            logits, k, v = self._logits(depth, x, k, v, cb, self.rope, head)
            codes.append(SamplerBatch.draw(logits, i, frame))
            if i + 1 < len(self.codebooks):
                x = depth.embed_code(codes[-1], cb)
        return torch.stack(codes, dim=1)


def make_frame_step(
    model: MossTTSRealtime, sampler: SamplerBatch, max_rows: int, *, compile_step: bool
) -> FrameStep:
    """The compiled step on the CPU when asked for, else the eager one (CUDA: eager for now)."""
    if compile_step and model.device.type == "cpu":
        return CompiledFrameStep(model, sampler, max_rows)
    return FrameStep(model, sampler)
