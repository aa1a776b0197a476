"""Batched on-device sampler for the 16 codebooks, with upstream's exact filtering semantics.

Per codebook step, for every row at once: repetition penalty over the last `window` codes of
that codebook in the current turn (unique ids once; negative logits * p, positive / p; skipped
on the turn's first frame because its history is empty) -> temperature -> top-k (ties kept) ->
top-p as upstream computes it (ascending sort, cumulative softmax, drop entries <= 1 - top_p,
always keep the max) -> draw. A temperature below `MIN_TEMPERATURE` (0 included) is argmax
after the penalty. fp16/bf16 logits are drawn in fp32.

Randomness is counter-based (`core.model.noise`): the draw is Gumbel-max with noise hashed from
(seed, frame counter, codebook, vocab id), so a conversation's draws depend only on its own seed
and frame counter, never on which other rows share the batch, and nothing syncs with the host.

CPU fast path (batches of >= 3 rows that all have top_k > 0): only the max(top_k) + margin best
entries per row are selected, ordered, filtered and hashed, instead of sorting and hashing the
whole vocab; every draw is bit-identical to the full sort (see `_top_host`; tests pin it). It
runs on numpy views of the CPU tensors (one numpy call costs ~1 us, one small torch op ~5 us,
and a draw is some 40 small steps), keeping torch only where the bits depend on its kernels
(softmax, cumsum, log).

Compiled path (`draw_top`, traced into the compiled frame step): the same filtering on the
`width` largest entries (torch.topk, then the full sort's order), fixed shapes, no host read; a
row whose ties with its k-th value may run past the candidates is flagged and redrawn exactly.
Its softmax is inductor's, so a cumulative probability within float rounding of 1 - top_p could
cut differently from the eager draw (never seen in the tests, which compare codes).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.model.noise import M32, frame_keys, frame_keys_host, gumbel, gumbel_host, vocab_hash
from core.values import SamplingParams

# The fast path keeps `max top_k + _TIE_MARGIN` candidates so that ties with the k-th value that
# spill past top_k are still in hand; a row whose ties spill past the margin too falls back to the
# full sort for that codebook step.
_TIE_MARGIN = 8
# The fast path runs softmax over a candidate block whose length is congruent to the vocab size
# modulo _ALIGN, with the kept entries at its end like in the full ascending sort: every SIMD lane
# of torch's CPU reduction then sums the same values in the same order, so the probabilities (and
# hence the top-p cut) are bit-identical to the full-vocab softmax (tests pin this).
_ALIGN = 64
# From this many rows the fast path pays off (measured on CPU, tiny dims: at 1-2 rows its extra
# small ops cost what the full sort saves; at 16 rows it is ~5x faster, at 64 ~9x).
_FAST_PATH_MIN_ROWS = 3
# Temperatures below this draw greedily: the limit T -> 0, and logits / T stays finite.
MIN_TEMPERATURE = 1e-5


@dataclass(slots=True)
class FrameDraw:
    """The rows' sampling state gathered once per frame, shared by its 16 codebook steps."""

    history: Tensor  # [B, A, rvq] codes in the penalty window; V (no code) elsewhere
    penalty: Tensor  # [B, 1]
    divisor: Tensor  # [B, 1] temperature (1 where greedy)
    greedy: Tensor  # [B] bool: temperature below MIN_TEMPERATURE
    top_k: Tensor  # [B, 1] effective k in [1, V] (V where top-k is off)
    one_minus_top_p: Tensor  # [B, 1]
    keys: Tensor  # [B, rvq] hash key of each (row, codebook) for this frame's noise
    id_hash: Tensor  # [V] the vocab ids pre-mixed for the noise hash
    width: int  # candidates the top-k fast path keeps; 0 = full sort (some row has top_k 0)
    noise: Tensor | None  # [B, rvq, V] for the full sort; None: the fast path hashes per draw
    any_greedy: bool  # some row is greedy (always True off the CPU: no host read)
    host: HostFrame | None = None  # numpy views for the CPU fast path (width > 0)

    def codebook(self, codebook: Tensor) -> FrameDraw:
        """This frame's state for one codebook (Long[1]) only, for `draw_top`: a traced
        step picks its codebook by index, with no Python int. Static frames only."""
        assert self.noise is None and self.host is None, "prepare(static=True) frames only"
        return replace(self, history=self.history.index_select(2, codebook),
                       keys=self.keys.index_select(1, codebook))


@dataclass(slots=True)
class HostFrame:
    """The fast path's per-frame state as numpy arrays (CPU only; zero-copy where possible)."""

    history: np.ndarray  # [B, A, rvq] int64, V where empty
    penalty: np.ndarray  # [B, 1] logits dtype
    divisor: np.ndarray  # [B, 1] logits dtype
    top_k: np.ndarray  # [B, 1] int64
    keys: np.ndarray  # [B, rvq] uint32
    id_hash: np.ndarray  # [V] uint32
    greedy: np.ndarray | None  # [B] bool, None when no row is greedy
    rows: np.ndarray  # arange(B)[:, None], for fancy indexing


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
        # Parameters in double, as upstream computes them; each frame casts them to the logits'
        # dtype (the same bits as storing that dtype directly).
        f64 = dict(device=device, dtype=torch.float64)
        i64 = dict(device=device, dtype=torch.int64)
        self.temperature = torch.ones(size, **f64)
        self.one_minus_top_p = torch.zeros(size, **f64)
        self.top_k = torch.zeros(size, **i64)
        self.penalty = torch.ones(size, **f64)
        self.window = torch.ones(size, **i64)
        self.history = torch.zeros(size, max_window, rvq, **i64)  # ring buffer of frames
        self.count = torch.zeros(size, **i64)  # frames generated in the current turn
        self.seed_lo = torch.zeros(size, **i64)
        self.seed_hi = torch.zeros(size, **i64)
        self.counter = torch.zeros(size, **i64)  # frames drawn since reset: randomness index
        # Batches of at least this many rows take the top-k fast path (when every row has
        # top_k > 0); below it the full sort is as fast. Tests move it to force either path.
        self.fast_path_min_rows = _FAST_PATH_MIN_ROWS
        self._id_hash: Tensor | None = None
        self._id_hash_host: np.ndarray | None = None

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
        self.one_minus_top_p[row] = 1.0 - params.top_p
        self.top_k[row] = params.top_k
        self.penalty[row] = params.repetition_penalty
        self.window[row] = params.repetition_window
        self.seed_lo[row] = seed & M32
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

    def prepare(
        self, idx: Tensor, vocab: int, dtype: torch.dtype, *, static: bool = False
    ) -> FrameDraw:
        """Gather the rows' state once per frame (history window, params, noise keys).

        Half-precision logits are drawn in fp32 (`draw` upcasts them): 23-bit uniforms and
        Gumbel noise do not fit fp16/bf16. `static` takes the path with fixed shapes and no
        host reads on every device (whole window, noise hashed per draw), the one the
        compiled frame traces (`draw_top`); `draw` on it draws the same.
        """
        dtype = torch.promote_types(dtype, torch.float32)
        count = self.count[idx]
        history = self._window(idx, count, vocab, static=static)
        temp = self.temperature[idx]
        k_set = self.top_k[idx]
        k = torch.where(k_set > 0, k_set, vocab).clamp(1, vocab)
        keys, id_hash = self._keys(idx), self._vocab_hash(vocab)
        width = 0 if static else self._fast_width(k_set, vocab)
        greedy = temp < MIN_TEMPERATURE
        frame = FrameDraw(
            history=history,
            penalty=self.penalty[idx][:, None].to(dtype),
            divisor=torch.where(greedy, 1.0, temp)[:, None].to(dtype),
            greedy=greedy,
            top_k=k[:, None],
            one_minus_top_p=self.one_minus_top_p[idx][:, None].to(dtype),
            keys=keys,
            id_hash=id_hash,
            width=width,
            noise=None if width or static else gumbel(keys[:, :, None], id_hash, dtype),
            # constant on static frames: a compiled graph guards on it
            any_greedy=static or idx.device.type != "cpu" or bool(greedy.any()),
        )
        if width:  # only ever on the CPU (see `_fast_width`)
            if self._id_hash_host is None or self._id_hash_host.shape[0] != vocab:
                self._id_hash_host = id_hash.numpy().astype(np.uint32)
            frame.host = HostFrame(
                history=frame.history.numpy(),
                penalty=frame.penalty.numpy(),
                divisor=frame.divisor.numpy(),
                top_k=frame.top_k.numpy(),
                keys=keys.numpy().astype(np.uint32),
                id_hash=self._id_hash_host,
                greedy=greedy.numpy() if frame.any_greedy else None,
                rows=np.arange(idx.shape[0])[:, None],
            )
        return frame

    def _window(self, idx: Tensor, count: Tensor, vocab: int, *, static: bool) -> Tensor:
        """The rows' penalty windows [B, A, rvq], id V where a row has fewer frames.

        On the CPU only the A = max(min(count, window)) most recent frames are gathered (reading
        the max is free there), not the whole ring: the penalty scatters the same (row, id)
        pairs either way. Elsewhere (or `static`) the whole ring, so nothing waits for the host.
        """
        w = self.max_window
        n = torch.minimum(count, self.window[idx])
        if idx.device.type == "cpu" and not static:
            ages = torch.arange(max(1, int(n.max())) if n.numel() else 1)
            pos = (count[:, None] - 1 - ages[None, :]) % w
            return torch.where((ages[None, :] < n[:, None])[:, :, None],
                               self.history[idx[:, None], pos], vocab)
        age = (count[:, None] - 1 - torch.arange(w, device=idx.device)[None, :]) % w
        return torch.where((age < n[:, None])[:, :, None], self.history[idx], vocab)

    def _fast_width(self, k_set: Tensor, vocab: int) -> int:
        """Candidates for the top-k fast path, or 0 for the full sort.

        Only on the CPU, where reading max(top_k) costs nothing; on CUDA it would stall the
        stream once per frame, and the full sort is a single cheap kernel there anyway.
        """
        if k_set.device.type != "cpu" or k_set.numel() < max(1, self.fast_path_min_rows):
            return 0
        if not bool((k_set > 0).all()):
            return 0
        width = int(k_set.max()) + _TIE_MARGIN
        return width if width < vocab else 0

    def _keys(self, idx: Tensor) -> Tensor:
        """Noise key [B, rvq] of this frame for rows `idx`."""
        if idx.device.type == "cpu":
            keys = frame_keys_host(self.seed_lo[idx].numpy(), self.seed_hi[idx].numpy(),
                                   self.counter[idx].numpy(), self.rvq)
            return torch.from_numpy(keys.astype(np.int64))
        return frame_keys(self.seed_lo[idx], self.seed_hi[idx], self.counter[idx], self.rvq)

    def _vocab_hash(self, vocab: int) -> Tensor:
        """The per-id half of the noise hash, cached (same vocab every frame)."""
        if self._id_hash is None or self._id_hash.shape[0] != vocab:
            self._id_hash = vocab_hash(vocab, self.device)
        return self._id_hash

    @staticmethod
    def _penalize(logits: Tensor, codebook: int, frame: FrameDraw) -> Tensor:
        """Scale the logits of the window's ids (gather/scatter of <= W entries per row, not a
        pass over the vocab); id V marks empty history slots and lands in a scratch column."""
        vocab = logits.shape[1]
        out = F.pad(logits, (0, 1))
        hist = frame.history[:, :, codebook]
        cur = out.gather(1, hist)
        p = frame.penalty
        out.scatter_(1, hist, torch.where(cur < 0, cur * p, cur / p))  # duplicates: same value
        return out[:, :vocab]

    @staticmethod
    def _filter_sorted(logits: Tensor, frame: FrameDraw) -> tuple[Tensor, Tensor]:
        """Temperature, top-k, top-p on penalised logits; returns (ascending filtered, order)."""
        asc, order = (logits / frame.divisor).sort(dim=-1, stable=True)
        kth = asc.gather(1, asc.shape[1] - frame.top_k)  # k-th largest; ties with it are kept
        asc = asc.masked_fill(asc < kth, float("-inf"))
        remove = asc.softmax(dim=-1).cumsum(dim=-1) <= frame.one_minus_top_p
        remove[:, -1] = False  # the maximum always stays
        return asc.masked_fill(remove, float("-inf")), order

    @staticmethod
    def _draw_host(logits: Tensor, codebook: int, frame: FrameDraw) -> Tensor | None:
        """`draw` on the fast path in numpy (same steps, same bits); None when it cannot serve
        this step (ties past the candidates, or logits of another dtype than prepared): the
        full sort then draws."""
        host = frame.host
        x = logits.detach().contiguous().numpy()
        if host is None or x.dtype != host.penalty.dtype:
            return None
        batch, vocab = x.shape
        # Repetition penalty: the window's ids gathered and scattered back (id V = scratch).
        pen = np.empty((batch, vocab + 1), dtype=x.dtype)
        pen[:, :vocab] = x
        pen[:, vocab] = 0
        rows = host.rows
        hist = host.history[:, :, codebook]
        cur = pen[rows, hist]
        p = host.penalty
        pen[rows, hist] = np.where(cur < 0, cur * p, cur / p)  # duplicates: same value
        pen = pen[:, :vocab]
        top = _top_host(pen / host.divisor, frame.width, host.top_k, frame.one_minus_top_p, rows)
        if top is None:
            return None
        asc, ids = top
        noise = gumbel_host(host.keys[:, codebook, None], host.id_hash[ids], x.dtype)
        sampled = ids[rows[:, 0], np.argmax(asc + noise, axis=1)]
        if host.greedy is not None:
            sampled = np.where(host.greedy, pen.argmax(axis=1), sampled)
        return torch.from_numpy(sampled)

    @staticmethod
    def draw(logits: Tensor, codebook: int, frame: FrameDraw) -> Tensor:
        """logits [B, V] of one codebook -> codes [B] (the hot path; fp16/bf16 drawn in fp32)."""
        logits = _at_least_fp32(logits)
        host_draw = frame.host is not None
        if host_draw and (codes := SamplerBatch._draw_host(logits, codebook, frame)) is not None:
            return codes
        logits = SamplerBatch._penalize(logits, codebook, frame)
        asc, ids = SamplerBatch._filter_sorted(logits, frame)
        if frame.noise is not None:
            noise = frame.noise[:, codebook].gather(1, ids)
        else:
            noise = gumbel(frame.keys[:, codebook, None], frame.id_hash[ids], logits.dtype)
        sampled = ids.gather(1, (asc + noise).argmax(dim=-1, keepdim=True))[:, 0]
        if not frame.any_greedy:
            return sampled
        return torch.where(frame.greedy, logits.argmax(dim=-1), sampled)

    @staticmethod
    def draw_top(logits: Tensor, frame: FrameDraw, width: int) -> tuple[Tensor, Tensor]:
        """`draw` of one codebook (a static frame picked by `FrameDraw.codebook`) over the
        `width` largest scaled logits instead of the whole sorted vocab: fixed shapes, no host
        read, traceable. Returns (codes [B], ok [B]); a row is not ok when ties with its k-th
        value may run past the candidates, and its code must then come from `draw`. Serves
        the rows `top_fits` marks (any other row's code is garbage). Every step is the full
        sort's on the same candidates in the same order (ascending value, ties by ascending
        id); the floats are rounded as the compiled graph rounds them."""
        logits = SamplerBatch._penalize(_at_least_fp32(logits), 0, frame)
        vals, ids = (logits / frame.divisor).topk(width, dim=-1)
        ids, by_id = ids.sort(dim=-1)
        asc, order = vals.gather(1, by_id).sort(dim=-1, stable=True)
        ids = ids.gather(1, order)
        kth = asc.gather(1, width - frame.top_k.clamp(max=width))  # rows not served: any k
        ok = (asc[:, 0] < kth[:, 0]) | frame.greedy  # kept ties all among the candidates
        asc = asc.masked_fill(asc < kth, float("-inf"))
        remove = asc.softmax(dim=-1).cumsum(dim=-1) <= frame.one_minus_top_p
        remove[:, -1] = False  # the maximum always stays
        asc = asc.masked_fill(remove, float("-inf"))
        noise = gumbel(frame.keys[:, :1], frame.id_hash[ids], logits.dtype)
        sampled = ids.gather(1, (asc + noise).argmax(dim=-1, keepdim=True))[:, 0]
        return torch.where(frame.greedy, logits.argmax(dim=-1), sampled), ok

    def top_fits(self, idx: Tensor, width: int) -> np.ndarray:
        """Bool[B] (numpy): the rows of `idx` that `draw_top` can serve: greedy, or top-k on
        and at most `width - margin` (so ties with the k-th rarely spill). Host read: CPU only."""
        k = self.top_k[idx]
        greedy = self.temperature[idx] < MIN_TEMPERATURE
        return (greedy | ((k > 0) & (k <= width - _TIE_MARGIN))).numpy()

    def sample(self, logits: Tensor, codebook: int, idx: Tensor) -> Tensor:
        """One codebook for rows `idx`, preparing the frame state on the fly (convenience)."""
        return self.draw(logits, codebook, self.prepare(idx, logits.shape[1], logits.dtype))

    def penalize(self, logits: Tensor, codebook: int, idx: Tensor) -> Tensor:
        """Repetition penalty over the last min(count, window) codes of this codebook."""
        logits = _at_least_fp32(logits)
        return self._penalize(logits, codebook, self.prepare(idx, logits.shape[1], logits.dtype))

    def filtered_logits(self, logits: Tensor, codebook: int, idx: Tensor) -> Tensor:
        """The logits the draw samples from (vocab order, -inf where filtered); for inspection."""
        logits = _at_least_fp32(logits)
        frame = self.prepare(idx, logits.shape[1], logits.dtype)
        asc, order = self._filter_sorted(self._penalize(logits, codebook, frame), frame)
        return torch.empty_like(asc).scatter_(1, order, asc)

    def save_rows(self, idx: Tensor) -> dict[str, Tensor]:
        """What `commit` will change for rows `idx` (counters and the history entries at their
        write positions), so a failed step can be undone with `restore_rows`."""
        pos = self.count[idx] % self.max_window
        return {"count": self.count[idx], "counter": self.counter[idx], "pos": pos,
                "frame": self.history[idx, pos]}

    def restore_rows(self, idx: Tensor, saved: dict[str, Tensor]) -> None:
        self.history[idx, saved["pos"]] = saved["frame"]
        self.count[idx] = saved["count"]
        self.counter[idx] = saved["counter"]

    def commit(self, codes: Tensor, idx: Tensor) -> None:
        """Record one frame per row (codes [B, 16]) in the history and advance the counters."""
        pos = self.count[idx] % self.max_window
        self.history[idx, pos] = codes.to(self.history.device)
        self.count[idx] += 1
        self.counter[idx] += 1


def _at_least_fp32(logits: Tensor) -> Tensor:
    """fp16/bf16 logits as fp32 (the noise and filtering need its precision); others as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _top_host(
    scaled: np.ndarray, width: int, top_k: np.ndarray, one_minus_top_p: Tensor, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """`_filter_sorted` restricted to the `width` best entries of `scaled` [B, V] (the fast
    path), or None when some row's ties with its k-th value may run past them.

    Returns the same ascending filtered values and vocab ids as the tail of the full sort,
    front-padded with -inf to a length aligned with the vocab (see `_ALIGN`). `rows` is
    arange(B)[:, None] (fancy indexing: cheaper than take_along_axis)."""
    batch, vocab = scaled.shape
    # The `width` largest per row (numpy's introselect: ~3x faster than torch.topk), put in the
    # full path's order: ascending value, ties by ascending vocab id (stable sort). numpy only
    # moves and compares values here (no arithmetic), so they stay bit-exact.
    pick = np.argpartition(scaled, vocab - width, axis=1)[:, vocab - width :]
    pick.sort(axis=1)
    vals = scaled[rows, pick]
    order = np.argsort(vals, axis=1, kind="stable")
    pad = (vocab - width) % _ALIGN  # -inf in front: the block length aligns with the vocab
    asc = np.full((batch, pad + width), -np.inf, dtype=scaled.dtype)
    ids = np.zeros((batch, pad + width), dtype=np.int64)
    asc[:, pad:] = vals[rows, order]
    ids[:, pad:] = pick[rows, order]
    kth = asc[rows, pad + width - top_k]
    if bool((asc[:, pad : pad + 1] >= kth).any()):  # ties with the k-th may run past width
        return None
    asc[asc < kth] = -np.inf
    # softmax and cumsum stay torch's: their bits depend on its CPU reduction (see `_ALIGN`)
    remove = (torch.from_numpy(asc).softmax(dim=-1).cumsum(dim=-1) <= one_minus_top_p).numpy()
    remove[:, -1] = False  # the maximum always stays
    asc[remove] = -np.inf
    return asc, ids
