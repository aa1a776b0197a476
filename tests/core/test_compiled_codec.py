"""The compiled codec step (CPU, inductor, dynamic batch) decodes what `decode_step` decodes:
the same audio within float rounding, the same positions, for one row (decoded as two copies
of itself), scattered slots, slots joining late and a slot reset mid-stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.codec import MossAudioCodec
from core.codec.compiled import CompiledDecode

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def codec(tiny_dirs: tuple[Path, Path]) -> MossAudioCodec:
    return MossAudioCodec.from_pretrained(tiny_dirs[1])


@torch.inference_mode()
def test_compiled_decode_equals_eager(codec: MossAudioCodec):
    """Prevents the compiled step from drifting from the reference or advancing other slots:
    over 30 frames, batches of 1, 2 and 4 rows in scattered slots, one slot reset and reused;
    the audio stays within 1e-5 of `decode_step` and every slot's position matches."""
    eager_state, compiled_state = codec.init_decode_state(6), codec.init_decode_state(6)
    step = CompiledDecode(codec, 16)
    step.warm_up(compiled_state)
    rings = [t for stage in compiled_state.stages for layer in stage.layers
             for t in (layer.k, layer.v)]
    assert all(int(t.count_nonzero()) == 0 for t in rings)  # warm-up's writes were reset
    gen = torch.Generator().manual_seed(3)
    schedule = [[4]] * 6 + [[5, 1]] * 6 + [[0, 2, 3, 5]] * 8 + [[4]] * 4 + [[2, 4, 1]] * 6
    for frame, slots in enumerate(schedule):
        if frame == 20:  # slot 4 starts a new turn: its rings and position go back to 0
            for state in (eager_state, compiled_state):
                state.reset(torch.tensor([4]))
        idx = torch.tensor(slots)
        codes = torch.randint(0, codec.codebook_size, (len(slots), 16), generator=gen)
        want = codec.decode_step(codes, idx, eager_state)
        got = step(codes, idx, compiled_state)
        assert got.shape == want.shape == (len(slots), codec.frame_samples)
        assert (got - want).abs().max() <= 1e-5, (frame, slots)
        assert torch.equal(compiled_state.frames, eager_state.frames)


@torch.inference_mode()
def test_compiled_decode_keeps_the_checks(codec: MossAudioCodec):
    """Prevents the compiled path from skipping validation: repeated slots, out-of-range
    codes and a shape mismatch raise the reference's ValueError, and nothing advances."""
    state = codec.init_decode_state(2)
    step = CompiledDecode(codec, 16)
    with pytest.raises(ValueError, match="distinct"):
        step(torch.zeros(2, 16, dtype=torch.long), torch.tensor([1, 1]), state)
    with pytest.raises(ValueError, match="not audio"):
        step(torch.full((1, 16), codec.codebook_size), torch.tensor([0]), state)
    with pytest.raises(ValueError, match="slots must be"):
        step(torch.zeros(2, 16, dtype=torch.long), torch.tensor([0]), state)
    assert int(state.frames.abs().sum()) == 0
