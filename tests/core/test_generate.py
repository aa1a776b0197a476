"""The single-conversation reference loop: stop logic, frame cap, and multi-turn KV reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.model import KVPool, MossTTSRealtime, SamplerBatch, SamplingParams, generate_turn
from core.prompt import PromptBuilder, TokenIds
from core.text import load_tokenizer
from core.tiny import (
    CODEC_SEED_OFFSET,
    MODEL_SEED_OFFSET,
    write_tiny,
    write_tiny_codec,
    write_tiny_model,
    write_tiny_tokenizer,
)

PAD = 1024
TEXT_PAD = 426


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_generate")
    write_tiny_tokenizer(path)
    write_tiny_model(path, seed=5)
    return path


@pytest.fixture(scope="module")
def model(tiny: Path) -> MossTTSRealtime:
    return MossTTSRealtime.from_pretrained(tiny, dtype=torch.float32)


@pytest.fixture(scope="module")
def builder(tiny: Path, model: MossTTSRealtime) -> PromptBuilder:
    tokenizer = load_tokenizer(tiny)
    return PromptBuilder(tokenizer, TokenIds.from_tokenizer(tokenizer, model.config))


def _prompt(n: int, offset: int = 0) -> torch.Tensor:
    rows = torch.full((n, 17), PAD, dtype=torch.long)
    rows[:, 0] = torch.arange(offset, offset + n) % 420
    return rows


def _kv(model: MossTTSRealtime) -> KVPool:
    return KVPool(model.config, num_blocks=64, block_size=8, dtype=model.dtype)


PAD_STEPS_TO_EOS = (16, 20)  # core.tiny: EOS once ~93% of a ~10-row window is padding


@pytest.mark.parametrize("length", [3, 12, 25])
def test_tiny_turns_end_by_eos_after_the_text(
    model: MossTTSRealtime, length: int, builder: PromptBuilder
):
    """Prevents a stop-logic regression (turns that never end, or end before their text): with
    sampling on, the tiny model ends each turn about 18 text-pad steps after its text, as
    `core.tiny` arranges (audio trails the text, as a real model's does)."""
    text = list(range(100, 100 + length))
    for seed in range(3):
        kv = _kv(model)
        result = generate_turn(
            model,
            kv,
            kv.new_sequence(),
            _prompt(20),
            text,
            SamplingParams(seed=seed),
            max_frames=100,
            builder=builder,
        )
        assert result.eos and result.text_consumed == length
        pad_steps = len(result.frames) - max(1, length - 11) + 1
        assert PAD_STEPS_TO_EOS[0] <= pad_steps <= PAD_STEPS_TO_EOS[1]
        assert (result.frames < 1024).all(), "special codes leaked into audio frames"
        fed_text = result.rows[20:, 0].tolist()
        assert fed_text == text + [TEXT_PAD] * pad_steps  # lead, one token per step, then pads
        assert torch.equal(result.rows[20 + min(12, length) :, 1:], result.frames)  # EOS not fed


def test_frame_cap_stops_a_turn_without_eos(model: MossTTSRealtime, builder: PromptBuilder):
    """Prevents an endless turn (and a stuck stream) when the model never samples EOS."""
    kv = _kv(model)
    seq = kv.new_sequence()
    never = MossTTSRealtime(model.config)
    never.load_state_dict(model.state_dict(), assign=False, strict=True)
    never.depth.heads.data[0, model.config.audio_eos_code] = 0.0  # EOS can no longer win
    result = generate_turn(
        never,
        kv,
        seq,
        _prompt(10),
        list(range(50, 60)),
        SamplingParams(seed=1),
        max_frames=7,
        builder=builder,
    )
    assert not result.eos and len(result.frames) == 7
    assert kv.length(seq) == len(result.rows) == 10 + 10 + 6  # the capped frame is not fed


def test_second_turn_prefills_only_new_rows(model: MossTTSRealtime, builder: PromptBuilder):
    """Prevents re-prefilling (or losing) history on turn 2: the kept cache must give exactly what
    a from-scratch prefill of the whole conversation gives."""
    double = MossTTSRealtime(model.config).double()
    double.load_state_dict({k: v.double() for k, v in model.state_dict().items()}, assign=True)
    kv = _kv(double)
    seq = kv.new_sequence()
    sampler = SamplerBatch.from_params([SamplingParams(seed=3)])
    turn1 = generate_turn(
        double, kv, seq, _prompt(15), list(range(200, 220)), sampler, max_frames=50, builder=builder
    )
    assert kv.length(seq) == len(turn1.rows)
    prompt2 = _prompt(9, offset=300)
    counter = sampler.counter.clone()
    turn2 = generate_turn(
        double, kv, seq, prompt2, list(range(330, 346)), sampler, max_frames=50, builder=builder
    )
    assert kv.length(seq) == len(turn1.rows) + len(turn2.rows)
    assert torch.equal(turn2.rows[:9], prompt2)

    fresh = kv.new_sequence()
    sampler.reset(0, SamplingParams(seed=3), counter=int(counter))
    replay = generate_turn(
        double,
        kv,
        fresh,
        torch.cat([turn1.rows, prompt2]),
        list(range(330, 346)),
        sampler,
        max_frames=50,
        builder=builder,
    )
    assert torch.equal(replay.frames, turn2.frames)
    assert replay.eos == turn2.eos


def test_empty_text_still_ends_and_bad_cap_raises(model: MossTTSRealtime, builder: PromptBuilder):
    """Prevents a turn whose text is empty from hanging: the builder's lone BOS pad row starts it
    and it ends by EOS; a non-positive frame cap is refused up front."""
    kv = _kv(model)
    seq = kv.new_sequence()
    result = generate_turn(
        model, kv, seq, _prompt(4), [], SamplingParams(seed=0), max_frames=40, builder=builder
    )
    assert result.eos and result.text_consumed == 0  # tiny: EOS ~18 text-pad rows in
    assert result.rows[4, 0].item() == TEXT_PAD and result.rows[4, 1].item() == 1025
    with pytest.raises(ValueError, match="max_frames"):
        generate_turn(
            model, kv, seq, _prompt(4), [5], SamplingParams(), max_frames=0, builder=builder
        )


def test_tiny_checkpoint_is_deterministic(tmp_path: Path):
    """Prevents flaky tests: the same seed writes byte-identical weights, another seed differs."""
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_tiny_model(tmp_path / name, seed)
    read = lambda n: (tmp_path / n / "model.safetensors").read_bytes()  # noqa: E731
    assert read("a") == read("b") != read("c")


def test_tiny_components_have_independent_seeds(tmp_path: Path):
    """Prevents regenerating one tiny component (e.g. the codec) from silently changing another
    and staling the committed upstream fixtures: `write_tiny` writes exactly what each
    component's writer writes alone with that component's own seed (which does matter)."""
    model_dir, codec_dir = write_tiny(tmp_path / "all", seed=5)
    write_tiny_model(tmp_path / "model", 5 + MODEL_SEED_OFFSET)
    write_tiny_codec(tmp_path / "codec", 5 + CODEC_SEED_OFFSET)
    write_tiny_tokenizer(tmp_path / "model")
    pairs = [
        (model_dir / "model.safetensors", tmp_path / "model" / "model.safetensors"),
        (model_dir / "tokenizer.json", tmp_path / "model" / "tokenizer.json"),
        (codec_dir / "model.safetensors", tmp_path / "codec" / "model.safetensors"),
    ]
    for ours, alone in pairs:
        assert ours.read_bytes() == alone.read_bytes(), ours
    _, other_codec = write_tiny(tmp_path / "other", seed=6)
    assert (other_codec / "model.safetensors").read_bytes() != pairs[2][1].read_bytes()


def test_sample_frame_is_batch_invariant(model: MossTTSRealtime):
    """Prevents a conversation's audio from changing when other conversations share its step
    (float64, where ties cannot flip): batched frames equal frames sampled alone."""
    double = MossTTSRealtime(model.config).double()
    double.load_state_dict({k: v.double() for k, v in model.state_dict().items()}, assign=True)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 64, generator=gen, dtype=torch.float64) * 3
    params = [
        SamplingParams(seed=s, temperature=t) for s, t in ((1, 0.8), (2, 1.0), (3, 0.0), (4, 0.8))
    ]
    batched = SamplerBatch(6)
    slots = torch.tensor([5, 0, 2, 3])
    for p, slot in zip(params, slots.tolist(), strict=True):
        batched.reset(slot, p)
    together = [double.sample_frame(hidden, batched, slots=slots) for _ in range(3)]
    for row, p in enumerate(params):
        alone = SamplerBatch.from_params([p])
        for frame in range(3):
            codes = double.sample_frame(hidden[row : row + 1], alone)
            assert torch.equal(codes[0], together[frame][row]), (row, frame)
