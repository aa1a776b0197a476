"""The top-k fast path of the sampler and the depth cache layout are optimisations only.

Each test runs the fast code next to the exact one (full ascending sort over the vocab, grouped
KV cache) and requires bit-identical results: the same codes for the same seed, counter and
history, whatever mix of settings shares the batch.
"""

from __future__ import annotations

import random

import torch

from core.model import SamplerBatch, SamplingParams
from core.model.depth import FrameCache
from core.model.noise import gumbel, vocab_hash
from core.model.sampling import _ALIGN, _TIE_MARGIN

V = 1027
FULL_SORT = 10**9  # fast_path_min_rows that no batch reaches


def _pair(params: list[SamplingParams], frames: torch.Tensor) -> tuple[SamplerBatch, SamplerBatch]:
    """(fast, exact) samplers with the same rows and `frames` [B, F, 16] of history."""
    fast, exact = SamplerBatch.from_params(params), SamplerBatch.from_params(params)
    fast.fast_path_min_rows, exact.fast_path_min_rows = 1, FULL_SORT
    idx = torch.arange(len(params))
    for f in range(frames.shape[1]):
        fast.commit(frames[:, f], idx)
        exact.commit(frames[:, f], idx)
    return fast, exact


def _random_params(rnd: random.Random, batch: int, *, allow_top_k_off: bool) -> list:
    ks = [1, 2, 5, 30, 30, 100] + ([0] if allow_top_k_off else [])
    return [
        SamplingParams(
            temperature=rnd.choice([0.0, 0.5, 0.8, 1.0, 1.3]),
            top_k=rnd.choice(ks),
            top_p=rnd.choice([0.1, 0.6, 0.95, 1.0]),
            repetition_penalty=rnd.choice([1.0, 1.1, 1.5]),
            repetition_window=rnd.choice([1, 10, 50]),
            seed=rnd.randrange(2**63),
        )
        for _ in range(batch)
    ]


def test_fast_path_draws_equal_the_full_sort():
    """Prevents the CPU speed-up from changing a conversation's audio: for mixed batches
    (greedy rows, top_p 1, tiny top_k, penalties, heavily tied logits, fp32 and fp64) every
    codebook's draw must equal the full-sort sampler's, and the fast path must really run."""
    fast_frames = 0
    for trial in range(24):
        rnd, gen = random.Random(trial), torch.Generator().manual_seed(trial)
        batch = rnd.choice([1, 3, 8])
        params = _random_params(rnd, batch, allow_top_k_off=False)
        dtype = torch.float64 if trial % 2 else torch.float32
        logits = torch.randn(batch, V, generator=gen, dtype=dtype) * rnd.choice([0.5, 2.0, 5.0])
        if trial % 3 == 0:
            logits = logits.round()  # many exact ties, also at the k-th value
        history = torch.randint(0, V, (batch, rnd.randrange(0, 60), 16), generator=gen)
        fast, exact = _pair(params, history)
        idx = torch.arange(batch)
        for _ in range(2):  # two frames: the counter advances the noise
            f_fast, f_exact = fast.prepare(idx, V, dtype), exact.prepare(idx, V, dtype)
            assert f_exact.width == 0
            fast_frames += f_fast.width > 0
            codes_fast = torch.stack(
                [fast.draw(logits.roll(7 * cb, 1), cb, f_fast) for cb in range(16)], 1
            )
            codes_exact = torch.stack(
                [exact.draw(logits.roll(7 * cb, 1), cb, f_exact) for cb in range(16)], 1
            )
            assert torch.equal(codes_fast, codes_exact), trial
            fast.commit(codes_fast, idx)
            exact.commit(codes_exact, idx)
    assert fast_frames == 48


def test_a_top_k_off_row_takes_the_full_sort_for_the_batch():
    """Prevents a top_k=0 row from being silently truncated to the other rows' top-k."""
    params = [
        SamplingParams(top_k=0, top_p=1.0, temperature=1.0, seed=1),
        SamplingParams(top_k=30, seed=2),
        SamplingParams(temperature=0.0, seed=3),
    ]
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(4))
    fast, exact = _pair(params, torch.zeros(3, 0, 16, dtype=torch.long))
    idx = torch.arange(3)
    frame = fast.prepare(idx, V, torch.float32)
    assert frame.width == 0
    for cb in range(16):
        assert torch.equal(
            fast.draw(logits, cb, frame),
            exact.draw(logits, cb, exact.prepare(idx, V, logits.dtype)),
        )


def test_ties_past_the_margin_fall_back_to_the_full_sort():
    """Prevents dropping codes that tie with the k-th best when more of them tie than the fast
    path holds (upstream keeps every tie): the draw must still match the full sort."""
    k = 3
    logits = torch.full((4, V), -4.0)
    logits[:, :2] = 3.0
    logits[:, 100 : 100 + k + _TIE_MARGIN + 20] = 1.0  # dozens of ties at the k-th value
    params = [SamplingParams(top_k=k, top_p=1.0, temperature=1.0, seed=s) for s in range(4)]
    fast, exact = _pair(params, torch.zeros(4, 0, 16, dtype=torch.long))
    idx = torch.arange(4)
    frame = fast.prepare(idx, V, torch.float32)
    assert frame.width == k + _TIE_MARGIN
    assert SamplerBatch._draw_host(logits, 0, frame) is None  # the fast path declines
    drawn = set()
    for cb in range(16):
        codes = fast.draw(logits, cb, frame)
        assert torch.equal(codes, exact.draw(logits, cb, exact.prepare(idx, V, torch.float32)))
        drawn.update(codes.tolist())
    assert drawn & set(range(100 + k + _TIE_MARGIN, 100 + k + _TIE_MARGIN + 20))


def test_candidate_probabilities_and_noise_are_bit_identical():
    """Prevents rare top-p cut or draw flips: the fast path's softmax over its aligned
    candidate block and its per-candidate noise must equal the full-vocab values bit for bit
    (they depend on torch's CPU reduction lanes; a torch upgrade that breaks this fails here)."""
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float64):
        for n in (1, 17, 38, 64, 200):
            asc = (torch.randn(6, V, generator=gen, dtype=dtype) * 3).sort(dim=-1).values
            asc[:, : V - n] = float("-inf")
            width = n + 5
            block = asc[:, V - width - (V - width) % _ALIGN :]
            full = asc.softmax(-1).cumsum(-1)[:, -block.shape[1] :]
            assert torch.equal(block.softmax(-1).cumsum(-1), full), (dtype, n)
        keys = torch.randint(0, 2**32, (6, 16), generator=gen)
        id_hash = vocab_hash(V, torch.device("cpu"))
        ids = torch.randint(0, V, (6, 45), generator=gen)
        every = gumbel(keys[:, :, None], id_hash, dtype)
        assert torch.equal(
            gumbel(keys[:, 5, None], id_hash[ids], dtype), every[:, 5].gather(1, ids)
        )


def test_depth_cache_attends_like_dense_grouped_attention():
    """Prevents the depth cache's folded GQA (query heads sharing a KV head as extra query rows)
    from reading the wrong KV head or position: it equals dense attention in which query head h
    reads KV head h // n_rep over every position written so far (float64)."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, n_kv, hd, steps = 5, 4, 2, 16, 16
    cache = FrameCache(2, batch, n_kv, steps, hd, torch.device("cpu"), torch.float64)
    keys = torch.zeros(2, batch, n_kv, steps, hd, dtype=torch.float64)
    values = torch.zeros_like(keys)
    for step in range(steps):
        for layer in range(2):
            q = torch.randn(batch, heads, hd, generator=gen, dtype=torch.float64)
            k, v = torch.randn(2, batch, n_kv, hd, generator=gen, dtype=torch.float64)
            keys[layer, :, :, step], values[layer, :, :, step] = k, v
            kh = keys[layer, :, :, : step + 1].repeat_interleave(heads // n_kv, dim=1)
            vh = values[layer, :, :, : step + 1].repeat_interleave(heads // n_kv, dim=1)
            weights = (torch.einsum("bhd,bhsd->bhs", q, kh) / hd**0.5).softmax(-1)
            expected = torch.einsum("bhs,bhsd->bhd", weights, vh)
            assert (cache.attend(layer, q, k, v) - expected).abs().max().item() < 1e-12
        cache.step += 1
