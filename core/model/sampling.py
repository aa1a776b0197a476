"""Batched on-device sampler for the 16 codebooks, with upstream's exact filtering semantics.

Per codebook step, for every row at once: repetition penalty over the last `window` codes of
that codebook in the current turn (unique ids once; negative logits * p, positive / p; skipped
on the turn's first frame because its history is empty) -> temperature -> top-k (ties kept) ->
top-p as upstream computes it (ascending sort, cumulative softmax, drop entries <= 1 - top_p,
always keep the max) -> draw. Temperature 0 is argmax after the penalty.

Randomness is counter-based, not a stateful generator: the draw uses Gumbel-max with noise
u = hash(seed, frame counter, codebook, vocab id), a 32-bit murmur3 finaliser chain computed
with exact int64 tensor arithmetic. A conversation's draws therefore depend only on its own
seed and frame counter, never on which other rows share the batch or where it sits in it, and
nothing synchronises with the host. argmax(logits/T + Gumbel) samples softmax(logits/T) exactly.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """Per-conversation sampling settings (upstream defaults); temperature 0 = argmax."""

    temperature: float = 0.8
    top_p: float = 0.6
    top_k: int = 30  # 0 disables top-k
    repetition_penalty: float = 1.1  # 1.0 disables the penalty
    repetition_window: int = 50
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.repetition_window, int) or self.repetition_window < 1:
            raise ValueError(
                f"repetition_window must be an int >= 1, got {self.repetition_window!r}"
            )
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), exact in int64 (no signed overflow)."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _M32


def _fmix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser: a bijective avalanche mix."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


@dataclass(slots=True)
class FrameDraw:
    """The rows' sampling state gathered once per frame, shared by its 16 codebook steps."""

    history: Tensor  # [B, W, rvq] codes in the penalty window; V (no code) elsewhere
    penalty: Tensor  # [B, 1]
    divisor: Tensor  # [B, 1] temperature (1 where greedy)
    greedy: Tensor  # [B] bool: temperature 0
    kth_index: Tensor  # [B, 1] ascending-sort index of the k-th largest logit
    one_minus_top_p: Tensor  # [B, 1]
    noise: Tensor  # [B, rvq, V] Gumbel noise of this frame


class SamplerBatch:
    """Per-row sampling state in fixed slots: params, repetition history, random counters.

    Rows are slots: `reset(slot, params)` starts a conversation there, `new_turn(slot)` clears
    the repetition history between turns (the random counter keeps running).
    """

    def __init__(
        self, size: int, *, device: torch.device | str = "cpu", rvq: int = 16, max_window: int = 50
    ) -> None:
        if size <= 0 or max_window <= 0:
            raise ValueError(f"size and max_window must be positive, got {size}, {max_window}")
        self.size, self.rvq, self.max_window = size, rvq, max_window
        f32 = dict(device=device, dtype=torch.float32)
        i64 = dict(device=device, dtype=torch.int64)
        self.temperature = torch.ones(size, **f32)
        self.one_minus_top_p = torch.zeros(size, **f32)
        self.top_k = torch.zeros(size, **i64)
        self.penalty = torch.ones(size, **f32)
        self.window = torch.ones(size, **i64)
        self.history = torch.zeros(size, max_window, rvq, **i64)  # ring buffer of frames
        self.count = torch.zeros(size, **i64)  # frames generated in the current turn
        self.seed_lo = torch.zeros(size, **i64)
        self.seed_hi = torch.zeros(size, **i64)
        self.counter = torch.zeros(size, **i64)  # frames drawn since reset: randomness index

    @classmethod
    def from_params(
        cls, params: list[SamplingParams], *, device: torch.device | str = "cpu", rvq: int = 16
    ) -> SamplerBatch:
        """One row per params entry, ready for the first frame of a turn."""
        batch = cls(
            len(params), device=device, rvq=rvq, max_window=max(p.repetition_window for p in params)
        )
        for row, p in enumerate(params):
            batch.reset(row, p)
        return batch

    @property
    def device(self) -> torch.device:
        return self.count.device

    def reset(self, row: int, params: SamplingParams, *, counter: int = 0) -> None:
        """Start a conversation in `row`: its params, a fresh history, its seed (random if None)."""
        if params.repetition_window > self.max_window:
            raise ValueError(
                f"repetition_window {params.repetition_window} exceeds this batch's "
                f"max_window {self.max_window}"
            )
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.temperature[row] = params.temperature
        self.one_minus_top_p[row] = 1.0 - params.top_p  # computed in double, as upstream does
        self.top_k[row] = params.top_k
        self.penalty[row] = params.repetition_penalty
        self.window[row] = params.repetition_window
        self.seed_lo[row] = seed & _M32
        self.seed_hi[row] = seed >> 32
        self.counter[row] = counter
        self.new_turn(row)

    def new_turn(self, row: int) -> None:
        """Forget the repetition history (upstream resets it per turn)."""
        self.count[row] = 0

    def rows(self, slots: Tensor | None, batch: int) -> Tensor:
        """Validated slot index for `batch` hidden rows."""
        if slots is None:
            if batch != self.size:
                raise ValueError(f"{batch} hidden rows for a sampler of {self.size}: pass slots")
            return torch.arange(batch, device=self.device)
        if slots.shape != (batch,):
            raise ValueError(f"slots must be Long[{batch}], got {tuple(slots.shape)}")
        return slots.to(self.device, torch.int64)

    def prepare(self, idx: Tensor, vocab: int, dtype: torch.dtype) -> FrameDraw:
        """Gather the rows' state once per frame (history window, params, all 16 noise rows)."""
        w = self.max_window
        count = self.count[idx]
        age = (count[:, None] - 1 - torch.arange(w, device=idx.device)[None, :]) % w
        valid = age < torch.minimum(count, self.window[idx])[:, None]
        temp = self.temperature[idx]
        k = self.top_k[idx]
        k = torch.where(k > 0, k, vocab).clamp(1, vocab)
        return FrameDraw(
            history=torch.where(valid[:, :, None], self.history[idx], vocab),
            penalty=self.penalty[idx][:, None].to(dtype),
            divisor=torch.where(temp > 0, temp, 1.0)[:, None].to(dtype),
            greedy=temp == 0,
            kth_index=(vocab - k)[:, None],
            one_minus_top_p=self.one_minus_top_p[idx][:, None].to(dtype),
            noise=self._gumbel(idx, vocab, dtype),
        )

    def _gumbel(self, idx: Tensor, vocab: int, dtype: torch.dtype) -> Tensor:
        """Gumbel noise [B, rvq, V] from hash(seed, counter, codebook, vocab id)."""
        key = _fmix32(self.seed_lo[idx] ^ 0x9E3779B9)
        key = _fmix32(key ^ self.seed_hi[idx])
        counter = self.counter[idx]
        key = _fmix32(key ^ (counter & _M32))
        key = _fmix32(key ^ ((counter >> 32) & _M32))
        codebooks = torch.arange(self.rvq, device=idx.device, dtype=torch.int64)
        key = _fmix32(key[:, None] ^ codebooks[None, :])  # [B, rvq]
        ids = _mul32(torch.arange(vocab, device=idx.device, dtype=torch.int64), 0x632BE5AB)
        h = _fmix32((key[:, :, None] + ids[None, None, :]) & _M32)
        u = ((h >> 8).to(dtype) + 0.5) / float(1 << 24)  # in (0, 1), never 0 or 1
        return -torch.log(-torch.log(u))

    @staticmethod
    def _penalize(logits: Tensor, codebook: int, frame: FrameDraw) -> Tensor:
        batch, vocab = logits.shape
        seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device)
        seen = seen.scatter_(1, frame.history[:, :, codebook], True)[:, :vocab]
        p = frame.penalty
        return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)

    @staticmethod
    def _filter_sorted(logits: Tensor, frame: FrameDraw) -> tuple[Tensor, Tensor]:
        """Temperature, top-k, top-p on penalised logits; returns (ascending filtered, order)."""
        asc, order = (logits / frame.divisor).sort(dim=-1, stable=True)
        kth = asc.gather(1, frame.kth_index)  # k-th largest; ties with it are kept
        asc = asc.masked_fill(asc < kth, float("-inf"))
        remove = asc.softmax(dim=-1).cumsum(dim=-1) <= frame.one_minus_top_p
        remove[:, -1] = False  # the maximum always stays
        return asc.masked_fill(remove, float("-inf")), order

    def draw(self, logits: Tensor, codebook: int, frame: FrameDraw) -> Tensor:
        """logits [B, V] (fp32 or fp64) of one codebook -> codes [B] (the hot path)."""
        logits = self._penalize(logits, codebook, frame)
        asc, order = self._filter_sorted(logits, frame)
        noise = frame.noise[:, codebook].gather(1, order)
        sampled = order.gather(1, (asc + noise).argmax(dim=-1, keepdim=True))[:, 0]
        return torch.where(frame.greedy, logits.argmax(dim=-1), sampled)

    def sample(self, logits: Tensor, codebook: int, idx: Tensor) -> Tensor:
        """One codebook for rows `idx`, preparing the frame state on the fly (convenience)."""
        return self.draw(logits, codebook, self.prepare(idx, logits.shape[1], logits.dtype))

    def penalize(self, logits: Tensor, codebook: int, idx: Tensor) -> Tensor:
        """Repetition penalty over the last min(count, window) codes of this codebook."""
        return self._penalize(logits, codebook, self.prepare(idx, logits.shape[1], logits.dtype))

    def filtered_logits(self, logits: Tensor, codebook: int, idx: Tensor) -> Tensor:
        """The logits the draw samples from (vocab order, -inf where filtered); for inspection."""
        frame = self.prepare(idx, logits.shape[1], logits.dtype)
        asc, order = self._filter_sorted(self._penalize(logits, codebook, frame), frame)
        return torch.empty_like(asc).scatter_(1, order, asc)

    def commit(self, codes: Tensor, idx: Tensor) -> None:
        """Record one frame per row (codes [B, 16]) in the history and advance the counters."""
        pos = self.count[idx] % self.max_window
        self.history[idx, pos] = codes.to(self.history.device)
        self.count[idx] += 1
        self.counter[idx] += 1
