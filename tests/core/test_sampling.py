"""The batched sampler against upstream's sampling semantics, and its randomness guarantees.

The reference functions below restate upstream's per-row algorithm literally (gather/scatter
penalty, top-k by k-th value, top-p by ascending sort); the batched sampler must agree with
them row by row, whatever the other rows in the batch are doing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.model import SamplerBatch, SamplingParams
from core.model.noise import M32, uniform, uniform_host

V = 1027


def _ref_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float, window: int):
    """Upstream: gather the last `window` ids, scale, scatter back (duplicates written once)."""
    out = logits.clone()[None]
    ht = history[-window:][None]
    cur = out.gather(1, ht)
    out.scatter_(1, ht, torch.where(cur < 0, cur * penalty, cur / penalty))
    return out[0]


def _ref_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """Upstream: /T, mask below the k-th largest, ascending-sort top-p keeping the max."""
    x = (logits / temperature)[None]
    kth = torch.topk(x, top_k, dim=-1).values[..., -1, None]
    x = x.masked_fill(x < kth, float("-inf"))
    sorted_x, sorted_idx = torch.sort(x, descending=False)
    cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = 0
    remove = torch.zeros_like(x, dtype=torch.bool).scatter(1, sorted_idx, remove)
    return x.masked_fill(remove, float("-inf"))[0]


def _with_history(params: list[SamplingParams], frames: torch.Tensor) -> SamplerBatch:
    """A sampler whose rows have all generated `frames` [B, F, 16] this turn."""
    sampler = SamplerBatch.from_params(params)
    idx = torch.arange(len(params))
    for f in range(frames.shape[1]):
        sampler.commit(frames[:, f], idx)
    return sampler


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_penalty_matches_upstream_and_skips_first_frame(dtype: torch.dtype):
    """Prevents audible loops or over-penalised speech from a penalty that differs from the one the
    model was tuned with (window, unique ids once, sign rule, nothing on the first frame); in
    float64 too, where a penalty stored in fp32 would differ."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=gen, dtype=dtype) * 3
    frames = torch.randint(0, 40, (3, 70, 16), generator=gen)  # many repeats
    params = [
        SamplingParams(repetition_penalty=p, repetition_window=w)
        for p, w in ((1.1, 50), (1.5, 7), (1.1, 1))
    ]
    idx = torch.arange(3)
    fresh = SamplerBatch.from_params(params)
    assert torch.equal(fresh.penalize(logits, 4, idx), logits)
    for n_frames in (1, 5, 70):
        sampler = _with_history(params, frames[:, :n_frames])
        for cb in (0, 9):
            out = sampler.penalize(logits, cb, idx)
            for row, p in enumerate(params):
                expected = _ref_penalty(
                    logits[row],
                    frames[row, :n_frames, cb],
                    p.repetition_penalty,
                    p.repetition_window,
                )
                assert torch.equal(out[row], expected), (n_frames, cb, row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.8, 30, 0.6), (1.0, 5, 1.0), (0.5, 1000, 0.9)]
)
def test_filter_matches_upstream(temperature: float, top_k: int, top_p: float, dtype: torch.dtype):
    """Prevents a top-k/top-p variant (descending sort, exclusive threshold) that keeps a
    different candidate set than upstream and changes the voice's variability; in float64 too,
    where parameters rounded to fp32 would scale and cut differently."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, V, generator=gen, dtype=dtype) * 2
    sampler = SamplerBatch.from_params(
        [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * 4
    )
    out = sampler.filtered_logits(logits, 0, torch.arange(4))
    for row in range(4):
        assert torch.equal(out[row], _ref_filter(logits[row], temperature, top_k, top_p))


def test_top_k_keeps_ties():
    """Prevents dropping a code that ties with the k-th best (upstream keeps all ties)."""
    logits = torch.full((1, V), -5.0)
    logits[0, [3, 7, 9, 11]] = torch.tensor([4.0, 2.0, 2.0, 2.0])
    sampler = SamplerBatch.from_params([SamplingParams(top_k=2, top_p=1.0, temperature=1.0)])
    kept = sampler.filtered_logits(logits, 0, torch.arange(1)).isfinite().nonzero()[:, 1]
    assert kept.tolist() == [3, 7, 9, 11]


def test_temperature_zero_is_argmax_after_penalty():
    """Prevents 'greedy' mode from ignoring the penalty (upstream applies it before argmax)."""
    logits = torch.zeros(2, V)
    logits[:, 10], logits[:, 20] = 5.0, 4.8
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.1),
        SamplingParams(temperature=0.0, repetition_penalty=1.0),
    ]
    frames = torch.full((2, 1, 16), 10)
    sampler = _with_history(params, frames)
    codes = sampler.sample(logits, 0, torch.arange(2))
    assert codes.tolist() == [20, 10]  # 5.0 / 1.1 < 4.8 on row 0; row 0 without penalty keeps 10


def test_draws_follow_the_filtered_distribution():
    """Prevents a biased sampler (wrong Gumbel transform, noise reused across vocab ids)."""
    n = 6000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0]).repeat(n, 1)
    sampler = SamplerBatch.from_params(
        [SamplingParams(temperature=1.0, top_k=4, top_p=1.0, seed=s) for s in range(n)], rvq=1
    )
    codes = sampler.sample(logits, 0, torch.arange(n))
    freq = torch.bincount(codes, minlength=6).float() / n
    expected = torch.softmax(torch.tensor([2.0, 1.5, 1.0, 0.2]), 0)
    assert freq[4:].sum() == 0
    assert (freq[:4] - expected).abs().max() < 0.025, (freq, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_is_finite_for_every_hash(dtype: torch.dtype):
    """Prevents drawing a code that top-k/top-p removed: with 24 hash bits the largest hash
    rounded to u = 1 in fp32, its Gumbel noise was +inf, and -inf + inf = NaN won the argmax.
    The extreme hashes must give u strictly inside (0, 1) and finite noise, in torch and numpy."""
    h = torch.tensor([0, 1, 2**31, M32 - 1, M32], dtype=torch.int64)
    u = uniform(h, dtype)
    assert bool(((u > 0) & (u < 1)).all()), u
    assert bool((-torch.log(-torch.log(u))).isfinite().all())
    host = uniform_host(h.numpy().astype(np.uint32), np.dtype(str(dtype).removeprefix("torch.")))
    assert torch.equal(torch.from_numpy(host), u)


def test_float64_top_p_cut_uses_the_exact_parameter():
    """Prevents 1 - top_p rounded to fp32 (0.4000000060) from dropping a candidate whose
    cumulative probability 0.4000000010 upstream keeps (it only drops entries <= 1 - top_p)."""
    logits = torch.full((1, V), float("-inf"), dtype=torch.float64)
    logits[0, 10], logits[0, 11] = np.log(0.4 + 1e-9), np.log(0.6 - 1e-9)
    sampler = SamplerBatch.from_params([SamplingParams(temperature=1.0, top_k=0, top_p=0.6)])
    kept = sampler.filtered_logits(logits, 0, torch.arange(1)).isfinite().nonzero()[:, 1]
    assert kept.tolist() == [10, 11]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_draw_only_kept_candidates(dtype: torch.dtype):
    """Prevents half-precision noise (23-bit uniforms overflow fp16 and round to 1 in bf16:
    NaN or +inf noise) from drawing a code that top-k removed."""
    logits = torch.zeros(1, V, dtype=dtype)
    logits[0, 5] = 3.0
    for seed in range(100):
        sampler = SamplerBatch.from_params(
            [SamplingParams(top_k=1, top_p=1.0, repetition_penalty=1.0, seed=seed)]
        )
        assert sampler.sample(logits, 0, torch.arange(1)).item() == 5, seed


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
def test_a_vanishing_temperature_is_greedy(temperature: float):
    """Prevents logits / T from overflowing to +-inf (every code tied, so id 0 or the lowest
    positive id won whatever the logits said): a temperature below 1e-5 draws the argmax."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, V, generator=gen) * 5 - 20
    logits[0, 700], logits[1, 300] = -1.0, 10.0
    sampler = SamplerBatch.from_params(
        [SamplingParams(temperature=temperature, repetition_penalty=1.0, seed=s) for s in (1, 2)]
    )
    assert sampler.sample(logits, 0, torch.arange(2)).tolist() == [700, 300]


def test_rows_are_independent_and_batch_invariant():
    """Prevents one conversation's sound from changing when others join, leave or reorder the
    batch: a row's draw depends only on its own params, seed, counter and history."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, V, generator=gen, dtype=torch.float64)
    params = [
        SamplingParams(seed=11),
        SamplingParams(temperature=1.3, top_k=100, top_p=0.95, seed=12),
        SamplingParams(temperature=0.0, seed=13),
        SamplingParams(top_p=0.2, seed=14),
        SamplingParams(repetition_penalty=2.0, repetition_window=3, seed=15),
    ]
    frames = torch.randint(0, V, (5, 4, 16), generator=gen)
    together = _with_history(params, frames).sample(logits, 3, torch.arange(5))
    for row in range(5):
        alone = _with_history([params[row]], frames[row : row + 1]).sample(
            logits[row : row + 1], 3, torch.arange(1)
        )
        assert alone.item() == together[row].item(), row
    perm = torch.tensor([4, 2, 0, 3, 1])
    shuffled = _with_history([params[i] for i in perm], frames[perm]).sample(
        logits[perm], 3, torch.arange(5)
    )
    assert torch.equal(shuffled, together[perm])
    # slot indexing: the same rows served out of a larger slot table, in another order
    table = SamplerBatch(8, max_window=50)
    slots = torch.tensor([6, 1, 3, 0, 7])
    for row, slot in enumerate(slots.tolist()):
        table.reset(slot, params[row])
    for f in range(4):
        table.commit(frames[:, f], slots)
    assert torch.equal(table.sample(logits, 3, slots), together)


def test_seeded_randomness_is_reproducible_and_advances():
    """Prevents identical frames repeating (noise not advancing) and unreproducible seeded runs."""
    logits = torch.zeros(1, V)

    def run(seed):
        sampler = SamplerBatch.from_params(
            [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=seed)]
        )
        out = []
        for _ in range(6):
            code = sampler.sample(logits, 0, torch.arange(1))
            sampler.commit(code.repeat(1, 16), torch.arange(1))
            out.append(code.item())
        return out

    assert run(5) == run(5)
    assert run(5) != run(6)
    assert len(set(run(5))) > 3  # a flat distribution over 1027 codes: draws must differ


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(repetition_penalty=0.0),
        dict(repetition_window=0),
        dict(repetition_window=257),  # more history than an engine slot keeps
        dict(seed=-3),
        dict(seed=2**63),
    ],
)
def test_bad_params_raise(kwargs):
    """Prevents nonsense settings from reaching the device and producing NaNs or silence."""
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_window_larger_than_buffer_and_wrong_slots_raise():
    """Prevents a silently truncated penalty window and mis-sized slot indexes."""
    sampler = SamplerBatch(2, max_window=10)
    with pytest.raises(ValueError, match="max_window"):
        sampler.reset(0, SamplingParams(repetition_window=50))
    with pytest.raises(ValueError, match="slots"):
        sampler.rows(None, 1)
    with pytest.raises(ValueError, match="slots"):
        sampler.rows(torch.tensor([0, 1]), 1)
