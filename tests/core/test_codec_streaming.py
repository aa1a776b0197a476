"""Streaming codec decode on the tiny codec: equals whole-clip decode, per-slot isolation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.codec import MossAudioCodec
from core.tiny import write_tiny_codec

FRAME = 1920


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> MossAudioCodec:
    directory: Path = tmp_path_factory.mktemp("tiny") / "codec"
    write_tiny_codec(directory, seed=7)
    return MossAudioCodec.from_pretrained(directory)


def _codes(seed: int, frames: int) -> torch.Tensor:
    return torch.randint(0, 1024, (frames, 16), generator=torch.Generator().manual_seed(seed))


def _longest_window_frames(codec: MossAudioCodec) -> int:
    windows = [s.context / s.rate for s in codec.config.decoder if hasattr(s, "context")]
    return int(max(windows) * codec.config.frame_rate + 0.5)


def test_tiny_codec_windows_are_short(codec: MossAudioCodec) -> None:
    """Guards the other tests: if windows were long, 'past the window' would never be exercised."""
    assert _longest_window_frames(codec) <= 10
    assert codec.frame_samples == FRAME and codec.sample_rate == 24000


def test_streaming_equals_whole_clip_past_every_window(codec: MossAudioCodec) -> None:
    """Prevents clicks/drift after the first seconds of a turn (upstream's ring loses keys)."""
    frames = 3 * _longest_window_frames(codec) + 5
    codes = _codes(0, frames)
    offline = codec.decode(codes)
    state = codec.init_decode_state(3)
    streamed = torch.cat(
        [codec.decode_step(codes[i : i + 1], torch.tensor([1]), state)[0] for i in range(frames)]
    )
    torch.testing.assert_close(streamed, offline, atol=2e-5, rtol=0)
    assert int(state.frames[1]) == frames and int(state.frames[0]) == 0


def test_whole_clip_decode_is_causal(codec: MossAudioCodec) -> None:
    """A prefix decodes to the same audio as the start of the longer clip (zero lookahead)."""
    codes = _codes(1, 20)
    full = codec.decode(codes)
    for length in (1, 7, 13):
        torch.testing.assert_close(
            codec.decode(codes[:length]), full[: length * FRAME], atol=2e-5, rtol=0
        )


@pytest.mark.parametrize("slot_ids", [[0, 1, 2], [4, 0, 2]], ids=["contiguous", "gathered"])
def test_batched_streams_with_offsets_equal_each_alone(
    codec: MossAudioCodec, slot_ids: list[int]
) -> None:
    """Prevents one conversation's audio from depending on who else is speaking."""
    starts, frames = [0, 5, 11], 26
    seqs = [_codes(10 + i, frames - s) for i, s in enumerate(starts)]
    state = codec.init_decode_state(5)
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in range(frames):
        live = [i for i, s in enumerate(starts) if step >= s]
        codes = torch.stack([seqs[i][step - starts[i]] for i in live])
        out = codec.decode_step(codes, torch.tensor([slot_ids[i] for i in live]), state)
        for row, i in enumerate(live):
            got[i].append(out[row])
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(torch.cat(got[i]), codec.decode(seq), atol=2e-5, rtol=0)


def test_streams_join_and_leave_midway(codec: MossAudioCodec) -> None:
    """A slot reused by a new stream after a reset starts clean; absent slots do not advance."""
    first, second, third = _codes(20, 12), _codes(21, 18), _codes(22, 6)
    # slot 0: `first` on steps 0-11, idle 12-13, reset, `third` on 14-19; slot 1: `second` 0-17.
    plan = {0: [(first, 0, 12), (third, 14, 20)], 1: [(second, 0, 18)]}
    state = codec.init_decode_state(2)
    outs: dict[int, list[torch.Tensor]] = {id(x): [] for x in (first, second, third)}
    for step in range(20):
        if step == 14:
            state.reset(torch.tensor([0]))
        live = [
            (slot, seq, start)
            for slot, spans in plan.items()
            for seq, start, end in spans
            if start <= step < end
        ]
        if not live:
            continue
        codes = torch.stack([seq[step - start] for _, seq, start in live])
        out = codec.decode_step(codes, torch.tensor([slot for slot, _, _ in live]), state)
        for row, (_, seq, _) in enumerate(live):
            outs[id(seq)].append(out[row])
    for seq in (first, second, third):
        torch.testing.assert_close(torch.cat(outs[id(seq)]), codec.decode(seq), atol=2e-5, rtol=0)
    assert state.frames.tolist() == [6, 18]


def test_resetting_one_slot_leaves_others_bit_identical(codec: MossAudioCodec) -> None:
    """Prevents a new turn in one room from perturbing audio already playing in another."""
    a, b, b2 = _codes(30, 20), _codes(31, 20), _codes(32, 20)

    def run(reset_at: int | None) -> torch.Tensor:
        state = codec.init_decode_state(2)
        outs = []
        for step in range(20):
            if step == reset_at:
                state.reset(torch.tensor([False, True]))
            other = b2 if reset_at is not None and step >= reset_at else b
            out = codec.decode_step(
                torch.stack([a[step], other[step]]), torch.tensor([0, 1]), state
            )
            outs.append(out[0])
        return torch.cat(outs)

    assert torch.equal(run(None), run(9))


def test_decode_step_rejects_bad_input(codec: MossAudioCodec) -> None:
    """Bad engine input fails loudly instead of corrupting another slot's state."""
    state = codec.init_decode_state(2)
    with pytest.raises(ValueError, match="distinct"):
        codec.decode_step(_codes(0, 2), torch.tensor([1, 1]), state)
    with pytest.raises(ValueError, match="distinct"):
        codec.decode_step(_codes(0, 1), torch.tensor([2]), state)
    with pytest.raises(ValueError, match="slots must be"):
        codec.decode_step(_codes(0, 2), torch.tensor([0]), state)
    with pytest.raises(ValueError, match="codes must be"):
        codec.decode_step(torch.zeros(1, 40, dtype=torch.long), torch.tensor([0]), state)
    special = _codes(0, 1)
    special[0, 3] = 1024  # the model's audio pad sampled on codebook 3
    with pytest.raises(ValueError, match=r"codes must be in \[0, 1024\)"):
        codec.decode_step(special, torch.tensor([0]), state)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 1024\)"):
        codec.decode(-special)
    assert state.frames.tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_codec_streams_like_its_whole_clip(
    codec: MossAudioCodec, tmp_path: Path, dtype: torch.dtype
) -> None:
    """Prevents a half-precision codec (half the GPU memory of fp32) from mixing dtypes in the
    ring caches or the quantizer: it loads, streams like its own whole-clip decode, stays close
    to fp32 and returns float32 audio; a non-float dtype is refused up front."""
    codec.save_pretrained(tmp_path)
    half = MossAudioCodec.from_pretrained(tmp_path, dtype=dtype)
    assert {p.dtype for p in half.decoder.parameters()} == {dtype}
    assert {p.dtype for p in half.quantizer.parameters()} == {torch.float32}
    codes = _codes(4, 12)
    whole = half.decode(codes)
    state = half.init_decode_state(2)
    streamed = torch.cat(
        [half.decode_step(codes[i : i + 1], torch.tensor([1]), state)[0] for i in range(12)]
    )
    assert whole.dtype == streamed.dtype == torch.float32
    torch.testing.assert_close(streamed, whole, atol=1e-2, rtol=0)
    torch.testing.assert_close(whole, codec.decode(codes), atol=5e-2, rtol=0)
    with pytest.raises(ValueError, match="dtype"):
        MossAudioCodec.from_pretrained(tmp_path, dtype=torch.int8)


def test_state_is_preallocated_and_reused(codec: MossAudioCodec) -> None:
    """Nothing is reallocated per step: the hot loop keeps the same buffers (CUDA-graph ready)."""
    state = codec.init_decode_state(2)
    pointers = [layer.k.data_ptr() for stage in state.stages for layer in stage.layers]
    for step in range(12):
        codec.decode_step(_codes(step, 2), torch.tensor([0, 1]), state)
    assert pointers == [layer.k.data_ptr() for stage in state.stages for layer in stage.layers]


def test_tiny_codec_matches_upstream_fixture(tmp_path: Path) -> None:
    """Our tiny checkpoint is the official format: upstream's own code decodes/encodes it the same.

    `tests/fixtures/codec_tiny_upstream.npz` was produced by running upstream
    `MossAudioTokenizerModel.from_pretrained` (OpenMOSS/MOSS-Audio-Tokenizer@56df9ee, fp32 CPU) on
    `write_tiny_codec(dir, seed=2)`: decode of `codes` [16, 10] and 16-codebook encode of `wave`.
    If `write_tiny_codec` changes on purpose, regenerate it the same way.
    """
    fixture = np.load(Path(__file__).resolve().parents[1] / "fixtures" / "codec_tiny_upstream.npz")
    write_tiny_codec(tmp_path, seed=2)
    codec = MossAudioCodec.from_pretrained(tmp_path)
    codes = torch.from_numpy(fixture["codes"].astype(np.int64)).T
    np.testing.assert_allclose(codec.decode(codes).numpy(), fixture["audio"], atol=1e-5, rtol=0)
    encoded = codec.encode(torch.from_numpy(fixture["wave"]), n_quantizers=16)
    np.testing.assert_array_equal(encoded.numpy(), fixture["codes_encoded"].T)
