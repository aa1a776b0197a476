"""Official safetensors names <-> our fused parameter layout, with a strict report.

Official checkpoints store q/k/v and gate/up separately and one tensor per codebook table/head;
we fuse q/k/v into `wqkv`, gate/up into `w13`, and stack the per-codebook tables. Loading checks
the full inventory first and names every missing, unexpected or wrongly shaped key in one
`CheckpointError`, so a truncated or foreign checkpoint is reported precisely.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.errors import CheckpointError
from core.model.config import ModelConfig, TransformerConfig

# A byte-identical duplicate of `embed_tokens.0.weight` that upstream never reads.
DUPLICATE_TEXT_EMBED = "language_model.embed_tokens.weight"
_BACKBONE, _LOCAL = "language_model.", "local_transformer.model."


def _layer_shapes(tc: TransformerConfig) -> dict[str, tuple[int, ...]]:
    d, hd = tc.hidden_size, tc.head_dim
    return {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (tc.num_heads * hd, d),
        "self_attn.k_proj.weight": (tc.num_kv_heads * hd, d),
        "self_attn.v_proj.weight": (tc.num_kv_heads * hd, d),
        "self_attn.o_proj.weight": (d, tc.num_heads * hd),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (tc.intermediate_size, d),
        "mlp.up_proj.weight": (tc.intermediate_size, d),
        "mlp.down_proj.weight": (d, tc.intermediate_size),
    }


def official_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every official tensor name (without the skipped duplicate) and its shape."""
    d, v = config.hidden_size, config.audio_vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.0.weight": (config.text_vocab_size, d)}
    for j in range(config.rvq):
        shapes[f"embed_tokens.{j + 1}.weight"] = (v, d)
    for prefix, tc in ((_BACKBONE, config.backbone), (_LOCAL, config.local)):
        for n in range(tc.num_layers):
            for suffix, shape in _layer_shapes(tc).items():
                shapes[f"{prefix}layers.{n}.{suffix}"] = shape
        shapes[f"{prefix}norm.weight"] = (tc.hidden_size,)
    for j in range(config.rvq - 1):
        shapes[f"{_LOCAL}embed_tokens.{j}.weight"] = (v, d)
    for j in range(config.rvq):
        shapes[f"local_transformer.local_lm_heads.{j}.weight"] = (v, d)
    return shapes


def check_inventory(tensors: dict[str, Tensor], config: ModelConfig) -> None:
    """Raise one CheckpointError naming all missing, unexpected and wrong-shape keys."""
    expected = official_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - {DUPLICATE_TEXT_EMBED})
    wrong = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)}, config expects {expected[k]}"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_short(wrong)}")
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + "; ".join(problems))


def _short(items: list[str], limit: int = 12) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more


def official_to_ours(
    tensors: dict[str, Tensor],
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> dict[str, Tensor]:
    """Validated official tensors -> our state dict, cast to `dtype` on `device`."""
    check_inventory(tensors, config)

    def get(name: str) -> Tensor:
        return tensors[name].to(device=device, dtype=dtype)

    def stack(names: list[str]) -> Tensor:
        return torch.stack([get(n) for n in names])

    out = {
        "text_embed": get("embed_tokens.0.weight"),
        "audio_embed": stack([f"embed_tokens.{j + 1}.weight" for j in range(config.rvq)]),
        "depth.embeds": stack([f"{_LOCAL}embed_tokens.{j}.weight" for j in range(config.rvq - 1)]),
        "depth.heads": stack(
            [f"local_transformer.local_lm_heads.{j}.weight" for j in range(config.rvq)]
        ),
    }
    for ours, prefix, tc in (
        ("backbone.", _BACKBONE, config.backbone),
        ("depth.", _LOCAL, config.local),
    ):
        out[f"{ours}norm.weight"] = get(f"{prefix}norm.weight")
        for n in range(tc.num_layers):
            src, dst = f"{prefix}layers.{n}.", f"{ours}layers.{n}."
            out[dst + "attention_norm.weight"] = get(src + "input_layernorm.weight")
            out[dst + "ffn_norm.weight"] = get(src + "post_attention_layernorm.weight")
            out[dst + "attention.wqkv.weight"] = torch.cat(
                [get(src + f"self_attn.{p}_proj.weight") for p in "qkv"]
            )
            out[dst + "attention.wo.weight"] = get(src + "self_attn.o_proj.weight")
            out[dst + "attention.q_norm.weight"] = get(src + "self_attn.q_norm.weight")
            out[dst + "attention.k_norm.weight"] = get(src + "self_attn.k_norm.weight")
            out[dst + "mlp.w13.weight"] = torch.cat(
                [get(src + "mlp.gate_proj.weight"), get(src + "mlp.up_proj.weight")]
            )
            out[dst + "mlp.w2.weight"] = get(src + "mlp.down_proj.weight")
    return out


def ours_to_official(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> official names (incl. the duplicate text table), contiguous CPU clones."""
    out: dict[str, Tensor] = {"embed_tokens.0.weight": state["text_embed"]}
    out[DUPLICATE_TEXT_EMBED] = state["text_embed"]
    for j in range(config.rvq):
        out[f"embed_tokens.{j + 1}.weight"] = state["audio_embed"][j]
        out[f"local_transformer.local_lm_heads.{j}.weight"] = state["depth.heads"][j]
    for j in range(config.rvq - 1):
        out[f"{_LOCAL}embed_tokens.{j}.weight"] = state["depth.embeds"][j]
    for ours, prefix, tc in (
        ("backbone.", _BACKBONE, config.backbone),
        ("depth.", _LOCAL, config.local),
    ):
        out[f"{prefix}norm.weight"] = state[f"{ours}norm.weight"]
        q, kv = tc.num_heads * tc.head_dim, tc.num_kv_heads * tc.head_dim
        for n in range(tc.num_layers):
            src, dst = f"{ours}layers.{n}.", f"{prefix}layers.{n}."
            out[dst + "input_layernorm.weight"] = state[src + "attention_norm.weight"]
            out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
            wq, wk, wv = state[src + "attention.wqkv.weight"].split([q, kv, kv])
            out[dst + "self_attn.q_proj.weight"] = wq
            out[dst + "self_attn.k_proj.weight"] = wk
            out[dst + "self_attn.v_proj.weight"] = wv
            out[dst + "self_attn.o_proj.weight"] = state[src + "attention.wo.weight"]
            out[dst + "self_attn.q_norm.weight"] = state[src + "attention.q_norm.weight"]
            out[dst + "self_attn.k_norm.weight"] = state[src + "attention.k_norm.weight"]
            gate, up = state[src + "mlp.w13.weight"].chunk(2)
            out[dst + "mlp.gate_proj.weight"] = gate
            out[dst + "mlp.up_proj.weight"] = up
            out[dst + "mlp.down_proj.weight"] = state[src + "mlp.w2.weight"]
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}
