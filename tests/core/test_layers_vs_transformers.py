"""Our backbone and depth transformer against `transformers.Qwen3Model` on the same weights (fp32).

transformers is the oracle: upstream runs an unmodified `Qwen3Model` as its backbone, and its
local transformer is the same Qwen3 block stack. Any drift in RMSNorm, q/k-norm, RoPE, GQA or
the fused q/k/v and gate/up layout shows up here as a hidden-state difference.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3Model
from transformers.cache_utils import DynamicCache

from core.hub import load_safetensors, read_json
from core.model import KVPool, MossTTSRealtime
from core.tiny import write_tiny_model

TOL = 1e-5
# transformers >= 5.x renames `past_key_values` to `cache`; support both.
_CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(Qwen3Model.forward).parameters else "past_key_values"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_model")
    write_tiny_model(path, seed=7)
    return path


def _oracle(tiny: Path, section: str, prefix: str) -> Qwen3Model:
    """A transformers Qwen3Model holding the checkpoint's `section` weights, in fp32."""
    cfg = dict(read_json(tiny / "config.json")[section])
    cfg.pop("model_type", None)
    cfg.setdefault("vocab_size", 1027)
    model = Qwen3Model(Qwen3Config(**cfg)).float().eval()
    tensors = load_safetensors(tiny)
    state = {  # rows are embedded by our model: the oracle's own table is never read
        k.removeprefix(prefix): v.float()
        for k, v in tensors.items()
        if k.startswith(prefix) and "embed_tokens" not in k
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["embed_tokens.weight"] and not unexpected, (missing, unexpected)
    return model


def _rows(n: int, gen: torch.Generator) -> torch.Tensor:
    rows = torch.randint(0, 1024, (n, 17), generator=gen)
    rows[:, 0] = torch.randint(0, 448, (n,), generator=gen)
    return rows


@torch.inference_mode()
def test_backbone_equals_qwen3model_with_and_without_cache(tiny: Path):
    """Prevents a backbone that only matches on one-shot prefill but drifts when the KV cache is
    reused across prefill chunks, decode steps and a second turn (what streaming does)."""
    ours = MossTTSRealtime.from_pretrained(tiny, dtype=torch.float32)
    oracle = _oracle(tiny, "language_config", "language_model.")
    gen = torch.Generator().manual_seed(0)
    turn1, steps, turn2 = _rows(21, gen), _rows(5, gen), _rows(9, gen)
    everything = torch.cat([turn1, steps, turn2])

    full = oracle(inputs_embeds=ours.embed_rows(everything)[None]).last_hidden_state[0]
    kv = KVPool(ours.config, num_blocks=24, block_size=4, dtype=torch.float32)
    one_shot = ours.forward_rows([everything], [kv.new_sequence()], kv, all_rows=True)
    assert (one_shot - full).abs().max().item() < TOL

    cache = DynamicCache()
    seq = kv.new_sequence()
    for chunk in [turn1, *steps.split(1), turn2]:
        theirs = oracle(
            inputs_embeds=ours.embed_rows(chunk)[None], use_cache=True, **{_CACHE_KWARG: cache}
        ).last_hidden_state[0]
        mine = ours.forward_rows([chunk], [seq], kv, all_rows=True)
        assert (mine - theirs).abs().max().item() < TOL
    assert kv.length(seq) == len(everything)


@torch.inference_mode()
def test_varlen_batch_equals_separate_sequences(tiny: Path):
    """Prevents cross-talk between conversations batched in one step (a prefill chunk next to
    1-row decode steps): each must get exactly what it gets alone."""
    ours = MossTTSRealtime.from_pretrained(tiny, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    kv = KVPool(ours.config, num_blocks=32, block_size=4, dtype=torch.float32)
    a, b, c = kv.new_sequence(), kv.new_sequence(), kv.new_sequence()
    ours.forward_rows([_rows(7, gen), _rows(3, gen)], [a, b], kv)
    new = [_rows(1, gen), _rows(6, gen), _rows(10, gen)]
    batched = ours.forward_rows(new, [a, b, c], kv)

    solo_kv = KVPool(ours.config, num_blocks=32, block_size=4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    history = [_rows(7, gen), _rows(3, gen), None]
    for i, rows in enumerate(new):
        s = solo_kv.new_sequence()
        if history[i] is not None:
            solo_kv_rows = torch.cat([history[i], rows])
        else:
            solo_kv_rows = rows
        alone = ours.forward_rows([solo_kv_rows], [s], solo_kv)
        assert (batched[i] - alone[0]).abs().max().item() < TOL, f"sequence {i}"


@torch.inference_mode()
def test_depth_transformer_equals_qwen3model(tiny: Path):
    """Prevents wrong local wiring (position 0 = backbone hidden, step i reads table i-1 of code
    i-1, head i): teacher-forced local logits must equal a Qwen3Model over the same inputs."""
    ours = MossTTSRealtime.from_pretrained(tiny, dtype=torch.float32)
    oracle = _oracle(tiny, "local_config", "local_transformer.model.")
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 64, generator=gen) * 2
    forced = torch.randint(0, 1024, (3, 16), generator=gen)
    logits = torch.zeros(3, 16, 1027)
    codes = ours.depth(hidden, lambda _logits, i: forced[:, i], logits_out=logits)
    assert torch.equal(codes, forced)

    inputs = [hidden] + [ours.depth.embeds[i][forced[:, i]] for i in range(15)]
    states = oracle(inputs_embeds=torch.stack(inputs, dim=1)).last_hidden_state  # [3, 16, D]
    expected = torch.einsum("bid,ivd->biv", states, ours.depth.heads)
    # fp32 error grows with the logit: core.tiny's EOS row reaches ~2000 on random hidden states
    torch.testing.assert_close(logits, expected, atol=TOL, rtol=1e-6)
