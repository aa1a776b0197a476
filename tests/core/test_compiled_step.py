"""The compiled frame step (CPU, inductor, per bucket) draws what the eager step draws: the same
codes and audio, the same sampler state after every frame, and padding rows touch no slot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from core.codec import MossAudioCodec
from core.codec.compiled import CompiledDecode
from core.engine.runner import ModelRunner, RowWork
from core.model import KVPool, MossTTSRealtime, SamplerBatch, SamplingParams
from core.model.frame_step import CompiledFrameStep

pytestmark = pytest.mark.timeout(600)

SLOTS = 8
# Penalty and sampling noise on, one greedy slot and one without top-k among them.
PARAMS = [SamplingParams(temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.3,
                         repetition_window=4, seed=s) for s in range(SLOTS)]
PARAMS[2] = SamplingParams(temperature=0.0, repetition_penalty=1.2, repetition_window=8, seed=2)
PARAMS[6] = SamplingParams(temperature=0.9, top_k=0, top_p=0.8, repetition_window=3, seed=6)


@pytest.fixture(scope="module")
def model(tiny_dirs: tuple[Path, Path]) -> MossTTSRealtime:
    return MossTTSRealtime.from_pretrained(tiny_dirs[0], dtype=torch.float32)


def _sampler() -> SamplerBatch:
    sampler = SamplerBatch(SLOTS, max_window=8)
    for slot, p in enumerate(PARAMS):
        sampler.reset(slot, p, counter=3 * slot)
    return sampler


def _state(sampler: SamplerBatch) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vars(sampler).items() if isinstance(v, torch.Tensor)}


@torch.inference_mode()
def test_compiled_codes_and_sampler_state_equal_eager(model: MossTTSRealtime):
    """Prevents the compiled step from drawing other codes than the eager reference, or from
    letting the copy of a lone row write into any slot: at 1 (run as 2), 2, 3 and 5 rows in
    scattered slots, over frames long enough to wrap the penalty window, codes and every
    sampler tensor (history, counters: all slots) equal the eager step's. Frames with a slot
    that has top-k off take the fallback, the others the whole-frame top-k graph."""
    gen = torch.Generator().manual_seed(0)
    eager, compiled = _sampler(), _sampler()
    step = CompiledFrameStep(model, compiled, max_rows=5)
    step.warm_up()
    schedule = ([4], [7, 1], [5, 0, 3], [6], [6, 2, 4, 1, 7], [2, 3, 5, 0, 1])
    for slots in schedule:
        idx = torch.tensor(slots)
        for _ in range(6):
            hidden = torch.randn(len(slots), model.config.hidden_size, generator=gen)
            want = model.sample_frame(hidden, eager, slots=idx)
            got = step(hidden, idx)
            assert torch.equal(got, want), slots
            for name, value in _state(eager).items():
                assert torch.equal(getattr(compiled, name), value), (slots, name)
    assert step.fallbacks == 12  # the frames with slot 6 (top-k off), no other


@torch.inference_mode()
def test_ties_past_the_candidates_fall_back_to_the_exact_draw(model: MossTTSRealtime):
    """Prevents the top-k graph from cutting ties with the k-th value at its 64 candidates: a
    zero hidden state gives codebook 0 all-equal logits (every id ties), the frame falls back
    and its codes equal the eager full-sort draw's."""
    eager, compiled = _sampler(), _sampler()
    step = CompiledFrameStep(model, compiled, max_rows=3)
    idx = torch.tensor([0, 3, 5])
    hidden = torch.zeros(3, model.config.hidden_size)
    want = model.sample_frame(hidden, eager, slots=idx)
    assert torch.equal(step(hidden, idx), want)
    assert step.fallbacks == 1


@torch.inference_mode()
def test_without_scan_every_frame_runs_step_by_step(model: MossTTSRealtime, monkeypatch):
    """Prevents a torch without the scan operator from breaking the compiled step: it warns
    and serves every frame through the per-step graph, with the eager codes."""
    import core.model.frame_step as frame_step

    monkeypatch.setattr(frame_step, "scan", None)
    eager, compiled = _sampler(), _sampler()
    step = CompiledFrameStep(model, compiled, max_rows=2)
    step.warm_up()
    gen = torch.Generator().manual_seed(4)
    for slots in ([3], [0, 5]):
        idx = torch.tensor(slots)
        hidden = torch.randn(len(slots), model.config.hidden_size, generator=gen)
        assert torch.equal(step(hidden, idx), model.sample_frame(hidden, eager, slots=idx))
    assert step.fallbacks == 2


def _runner(model: MossTTSRealtime, codec: MossAudioCodec, *, compile_step: bool):
    kv = KVPool(model.config, num_blocks=16, block_size=16, dtype=torch.float32)
    runner = ModelRunner(model, codec, kv, num_slots=4, compile_step=compile_step)
    seqs = [kv.new_sequence() for _ in range(3)]
    for slot in range(3):
        runner.start_turn(slot, PARAMS[slot + 3], counter=slot)
    return runner, seqs


@torch.inference_mode()
def test_compiled_runner_gives_eager_codes_and_audio(model: MossTTSRealtime,
                                                     tiny_dirs: tuple[Path, Path]):
    """Prevents a compiled engine from sounding different or compiling on a live stream:
    three, then two, then one stream through whole ticks (backbone, frame step, codec) give
    the eager runner's codes, and its audio within one int16 step (the compiled codec's float
    sums are ordered differently: ~1e-6); after warm-up no tick compiles a graph."""
    codec = MossAudioCodec.from_pretrained(tiny_dirs[1])
    runs = [_runner(model, codec, compile_step=c) for c in (False, True)]
    assert type(runs[1][0].frame_step) is CompiledFrameStep
    assert type(runs[1][0].decode) is CompiledDecode
    runs[1][0].warm_up()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the counter counts this process's compiled graphs
    prev = torch.zeros(3, 16, dtype=torch.long)
    gen = torch.Generator().manual_seed(1)
    for live in (3, 3, 3, 2, 2, 1, 1):
        rows = torch.cat([torch.randint(0, 400, (3, 1), generator=gen), prev], dim=1)
        outs = [r.step([RowWork(s, rows[i : i + 1], i) for i, s in enumerate(seqs[:live])])
                for r, seqs in runs]
        assert torch.equal(outs[1].codes, outs[0].codes)
        for got, want in zip(outs[1].audio, outs[0].audio, strict=True):
            assert got is not None and want is not None
            pcm = [np.frombuffer(a.pcm16, dtype="<i2").astype(int) for a in (got, want)]
            assert np.abs(pcm[0] - pcm[1]).max() <= 1
            assert got.energy == pytest.approx(want.energy, rel=1e-5)
        prev[:live] = outs[0].codes.clamp(max=1023)
    assert counters["stats"]["unique_graphs"] == graphs
