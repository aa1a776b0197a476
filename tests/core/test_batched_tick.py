"""The engine's per-tick batching shortcuts are exact: built once for all streams, they give
the same rows, PCM, energies, noise and rollback state as the per-stream code they replace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from core.engine.runner import frame_audio
from core.engine.turn import decode_rows
from core.model import ModelConfig, SamplerBatch, SamplingParams
from core.model.noise import frame_keys, frame_keys_host, gumbel, gumbel_host, vocab_hash
from core.prompt import PromptBuilder, TokenIds
from core.text import load_tokenizer


class _Turn:
    def __init__(self, frame: torch.Tensor) -> None:
        self.frames = [frame]


def test_decode_rows_equal_the_builders_step_rows(conformance_dir: Path):
    """Prevents the batched decode rows from feeding the model anything other than what
    `PromptBuilder.step_row` builds (text id or text pad, then the previous frame)."""
    model_dir = conformance_dir / "model"
    config = ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    tok = load_tokenizer(model_dir)
    builder = PromptBuilder(tok, TokenIds.from_tokenizer(tok, config))
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 1027, (5, 16), generator=gen)
    text_ids = [7, None, 100, None, 3]
    rows = decode_rows(builder, [_Turn(f) for f in frames], text_ids)
    assert len(rows) == 5
    for row, text_id, frame in zip(rows, text_ids, frames, strict=True):
        assert torch.equal(row, builder.step_row(text_id, frame))


def test_tick_audio_equals_per_stream_conversion():
    """Prevents audible or timing changes from converting a whole tick at once: int16 PCM and
    per-frame RMS must equal converting each stream's concatenated chunk on its own."""
    rng = np.random.default_rng(1)
    wave = (rng.standard_normal((7, 1920)) * 0.6).astype(np.float32)  # some samples clip
    frames = frame_audio(wave)
    for lo, hi in ((0, 1), (1, 3), (3, 7)):
        pcm = np.concatenate(list(wave[lo:hi]))
        pcm16 = (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
        assert b"".join(f.pcm16 for f in frames[lo:hi]) == pcm16
        per_frame = pcm.reshape(hi - lo, -1).astype(np.float64)
        assert [f.energy for f in frames[lo:hi]] == np.sqrt(np.mean(np.square(per_frame), 1)).tolist()


def test_host_noise_equals_torch_noise():
    """Prevents the numpy sampler path from drawing different codes: its Gumbel noise must equal
    the torch noise bit for bit (fp32 and fp64)."""
    gen = torch.Generator().manual_seed(2)
    id_hash = vocab_hash(1027, torch.device("cpu"))
    keys = torch.randint(0, 2**32, (8, 1), generator=gen)
    ids = torch.randint(0, 1027, (8, 3000), generator=gen)
    for dtype in (torch.float32, torch.float64):
        host = gumbel_host(keys.numpy().astype(np.uint32), id_hash.numpy().astype(np.uint32)[ids],
                           np.dtype(str(dtype).removeprefix("torch.")))
        assert torch.equal(torch.from_numpy(host), gumbel(keys, id_hash[ids], dtype))


def test_host_frame_keys_equal_the_tensor_hash():
    """Prevents the CPU's numpy frame keys from drawing other noise than the device hash:
    equal keys for random 64-bit seeds and for counters past 2**32."""
    gen = torch.Generator().manual_seed(5)
    seed_lo, seed_hi = (torch.randint(0, 2**32, (32,), generator=gen) for _ in range(2))
    counter = torch.randint(0, 2**40, (32,), generator=gen)
    counter[:4] = torch.tensor([0, 1, 2**32 - 1, 2**32])
    host = frame_keys_host(seed_lo.numpy(), seed_hi.numpy(), counter.numpy(), 16)
    assert host.dtype == np.uint32
    assert torch.equal(torch.from_numpy(host.astype(np.int64)),
                       frame_keys(seed_lo, seed_hi, counter, 16))


def test_sampler_rollback_undoes_a_commit():
    """Prevents a failed and retried tick from changing a stream's later draws: restoring the
    saved rows must undo `commit` exactly, also once the history ring has wrapped."""
    sampler = SamplerBatch(3, rvq=16, max_window=8)
    for row in range(3):
        sampler.reset(row, SamplingParams(repetition_window=8, seed=row))
    idx = torch.tensor([2, 0])
    gen = torch.Generator().manual_seed(3)
    for _ in range(11):  # past the ring size
        sampler.commit(torch.randint(0, 1024, (2, 16), generator=gen), idx)
    before = {k: v.clone() for k, v in vars(sampler).items() if isinstance(v, torch.Tensor)}
    saved = sampler.save_rows(idx)
    sampler.commit(torch.randint(0, 1024, (2, 16), generator=gen), idx)
    sampler.restore_rows(idx, saved)
    for name, value in before.items():
        assert torch.equal(getattr(sampler, name), value), name
