"""The compiled frame step (CPU, inductor, one graph per frame and a per-step fallback) draws what
the eager step draws: the same codes, audio within one int16 step, the same sampler state after
every frame; the copy of a lone row touches no slot, and nothing compiles after warm-up."""

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
# Penalty and sampling noise on; one greedy slot (top-k off: the graph still serves it), and
# three the top-k graph does not serve: top-k off (6, 7) and top_k 100, past its 64 candidates.
PARAMS = [SamplingParams(temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.3,
                         repetition_window=4, seed=s) for s in range(SLOTS)]
PARAMS[2] = SamplingParams(temperature=0.0, top_k=0, repetition_penalty=1.2, repetition_window=8,
                           seed=2)
PARAMS[6] = SamplingParams(temperature=0.9, top_k=0, top_p=0.8, repetition_window=3, seed=6)
PARAMS[7] = SamplingParams(temperature=1.1, top_k=0, top_p=0.95, repetition_window=5, seed=7)
PARAMS[5] = SamplingParams(temperature=0.7, top_k=100, top_p=0.9, repetition_window=6, seed=5)


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
    """Prevents the compiled step from drawing other codes than the eager reference, from
    letting the copy of a lone row write into any slot, or from compiling on a live frame: at
    1 (run as 2), 2, 3 and 5 rows in scattered slots, over frames long enough to wrap the
    penalty window, codes and every sampler tensor (history, counters: all slots) equal the
    eager step's. Rows the top-k graph does not serve (5, 6, 7) are redrawn by the fallback,
    alone, in batches of 1 and 3; no graph is compiled after warm-up."""
    gen = torch.Generator().manual_seed(0)
    eager, compiled = _sampler(), _sampler()
    step = CompiledFrameStep(model, compiled, max_rows=5)
    step.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the counter counts this process's compiled graphs
    schedule = ([4], [7, 1], [0, 2, 3], [6], [6, 2, 4, 1, 7], [2, 3, 5, 0, 1], [5, 6, 7])
    for slots in schedule:
        idx = torch.tensor(slots)
        for _ in range(6):
            hidden = torch.randn(len(slots), model.config.hidden_size, generator=gen)
            want = model.sample_frame(hidden, eager, slots=idx)
            got = step(hidden, idx)
            assert torch.equal(got, want), slots
            for name, value in _state(eager).items():
                assert torch.equal(getattr(compiled, name), value), (slots, name)
    assert step.fallbacks == 6 * 5  # the frames with slot 5, 6 or 7, no other
    assert counters["stats"]["unique_graphs"] == graphs


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


def test_each_compiled_step_has_its_own_graphs():
    """Prevents one engine's graphs from serving another model: module guards are skipped, so
    each compiled step must be a private copy (its own dynamo cache): two copies of one
    function compile two graphs."""
    from core.device import compile_step

    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    first, second = compile_step(double), compile_step(double)
    before = counters["stats"]["unique_graphs"]
    assert torch.equal(first(torch.ones(3)), second(torch.ones(3)))
    assert counters["stats"]["unique_graphs"] == before + 2


def _runner(model: MossTTSRealtime, codec: MossAudioCodec, *, compile_step: bool):
    kv = KVPool(model.config, num_blocks=16, block_size=16, dtype=torch.float32)
    runner = ModelRunner(model, codec, kv, num_slots=4, compile_step=compile_step)
    seqs = [kv.new_sequence() for _ in range(3)]
    for slot in range(3):
        runner.start_turn(slot, PARAMS[slot + 3], counter=slot)  # slot 2: top_k 100, fallback
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
