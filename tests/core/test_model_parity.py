"""Our model against the upstream code's own outputs on the conformance checkpoint (fp32, CPU).

The pack (`tests/fixtures/conformance`) holds a tiny checkpoint written by upstream `save_pretrained`
and what upstream inference computed on it: prefill/step rows, backbone hidden states, frame-0
local logits and the argmax codes (with upstream's repetition penalty, and without it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.model import KVPool, MossTTSRealtime, SamplerBatch, SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module")
def ref(conformance_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(conformance_dir / "ref_outputs.npz"))


@pytest.fixture(scope="module")
def model(conformance_dir: Path) -> MossTTSRealtime:
    return MossTTSRealtime.from_pretrained(conformance_dir / "model", dtype=torch.float32)


def _run(model, kv, seq, ref, scenario, penalty):
    """Feed upstream's rows; return (prefill hidden, per-frame hidden, frame-0 logits, codes)."""
    pre = torch.from_numpy(ref[f"tts/{scenario}/prefill_input_ids"])
    hidden = model.forward_rows([pre], [seq], kv, all_rows=True)
    sampler = SamplerBatch.from_params([SamplingParams(temperature=0, repetition_penalty=penalty)])
    logits0 = torch.zeros(1, 16, model.config.audio_vocab_size)
    frame_hidden = [hidden[-1:]]
    codes = [model.sample_frame(hidden[-1:], sampler, logits_out=logits0)]
    for row in torch.from_numpy(ref[f"tts/{scenario}/step_input_ids"]):
        h = model.forward_rows([row[None]], [seq], kv)
        frame_hidden.append(h)
        codes.append(model.sample_frame(h, sampler))
    return hidden, torch.cat(frame_hidden), logits0[0], torch.cat(codes)


def _check(ref, scenario, hidden, frame_hidden, logits0, codes):
    def close(ours, key, tol):
        theirs = torch.from_numpy(ref[f"tts/{scenario}/{key}"])
        assert ours.shape == theirs.shape, key
        err = (ours - theirs).abs().max().item()
        assert err < tol, f"{scenario}/{key}: max abs diff {err}"

    close(hidden, "prefill_hidden", TOL)
    close(frame_hidden, "frame_hidden", TOL)
    close(logits0, "frame0_local_logits", TOL)
    frames = torch.from_numpy(ref[f"tts/{scenario}/frames"])
    decided = torch.from_numpy(ref[f"tts/{scenario}/decision_margin"]) >= 1e-4
    assert decided.float().mean() > 0.9, "the reference should decide almost every code"
    bad = (codes != frames) & decided
    assert not bad.any(), (
        f"{scenario}: codes differ at (frame, codebook) {bad.nonzero().tolist()[:8]}"
    )


@pytest.mark.parametrize(
    ("scenario", "penalty"), [("text_only", 1.1), ("text_audio", 1.1), ("text_audio_norep", 1.0)]
)
def test_turn_matches_upstream(model, ref, scenario, penalty):
    """Prevents a model that loads but speaks differently from the official one (wrong embedding
    sum, RoPE, norm placement, local-transformer wiring or penalty semantics)."""
    kv = KVPool(model.config, num_blocks=32, block_size=16, dtype=torch.float32)
    out = _run(model, kv, kv.new_sequence(), ref, scenario, penalty)
    _check(ref, scenario, *out)


def test_text_audio_ends_with_eos_at_frame_15(model, ref):
    """Prevents a stop-logic regression: upstream's turn ends with codebook-0 EOS at frame 15."""
    kv = KVPool(model.config, num_blocks=32, block_size=16, dtype=torch.float32)
    *_, codes = _run(model, kv, kv.new_sequence(), ref, "text_audio", 1.1)
    assert codes[15, 0].item() == model.config.audio_eos_code
    assert (codes[:15, 0] != model.config.audio_eos_code).all()


def test_second_turn_on_kept_cache_matches_upstream(model, ref):
    """Prevents multi-turn context loss: turn 2 prefills only its new rows on turn 1's KV cache
    (which ends at the last real frame, EOS not fed back) and must still match upstream."""
    kv = KVPool(model.config, num_blocks=32, block_size=16, dtype=torch.float32)
    seq = kv.new_sequence()
    _run(model, kv, seq, ref, "text_audio", 1.1)
    assert kv.length(seq) == 259  # upstream's kv_len_before_turn
    _check(ref, "turn2", *_run(model, kv, seq, ref, "turn2", 1.1))


def test_whole_conversation_in_one_forward(model, ref):
    """Prevents chunking-dependent results: one forward over both turns equals streaming."""
    kv = KVPool(model.config, num_blocks=32, block_size=16, dtype=torch.float32)
    rows = torch.from_numpy(ref["tts/conversation_rows"])
    hidden = model.forward_rows([rows], [kv.new_sequence()], kv, all_rows=True)
    err = (hidden - torch.from_numpy(ref["tts/conversation_hidden"])).abs().max().item()
    assert err < TOL, err
