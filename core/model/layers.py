"""Qwen3 decoder blocks (RMSNorm, RoPE, GQA attention with q/k-norm, SwiGLU), gpt-fast sized.

Tokens are packed: every tensor is `[N, ...]` with one entry per token, whatever sequence it
belongs to. Where keys and values come from is the caller's business: each attention layer hands
its fresh q/k/v to an `AttentionContext`, which stores k/v in its cache and returns the attention
output. The backbone uses the paged `KVPool`; the depth transformer a frame-local cache.
q/k/v and gate/up are fused (`wqkv`, `w13`); `weights.py` maps the official split names.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.model.config import TransformerConfig


class AttentionContext(Protocol):
    """Stores a layer's new keys/values, then attends: q [N,H,hd], k/v [N,KV,hd] -> [N,H,hd]."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: statistics in fp32, the weight applied in the input dtype (as upstream)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, factor: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [N, head_dim] for integer positions, computed in fp32 like transformers."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (exponent / head_dim)) / factor
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE; x [N, heads, hd], cos/sin [N, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    """GQA self-attention with per-head RMSNorm on q and k before RoPE (Qwen3)."""

    def __init__(self, tc: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = tc.num_heads, tc.num_kv_heads, tc.head_dim
        qkv_out = (tc.num_heads + 2 * tc.num_kv_heads) * tc.head_dim
        self.wqkv = nn.Linear(tc.hidden_size, qkv_out, bias=False)
        self.wo = nn.Linear(tc.num_heads * tc.head_dim, tc.hidden_size, bias=False)
        self.q_norm = RMSNorm(tc.head_dim, tc.rms_norm_eps)
        self.k_norm = RMSNorm(tc.head_dim, tc.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext, layer: int
    ) -> Tensor:
        n = x.shape[0]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(self.q_norm(q.view(n, self.n_heads, self.head_dim)), cos, sin)
        k = apply_rope(self.k_norm(k.view(n, self.n_kv, self.head_dim)), cos, sin)
        out = ctx.attend(layer, q, k, v.view(n, self.n_kv, self.head_dim))
        return self.wo(out.reshape(n, q_size))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, tc: TransformerConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(tc.hidden_size, 2 * tc.intermediate_size, bias=False)
        self.w2 = nn.Linear(tc.intermediate_size, tc.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, tc: TransformerConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)
        self.attention = Attention(tc)
        self.ffn_norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)
        self.mlp = SwiGLU(tc)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext, layer: int
    ) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, ctx, layer)
        return x + self.mlp(self.ffn_norm(x))


_NATIVE_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """SDPA with grouped KV heads: q [B, H, T, hd], k/v [B, KV, S, hd] -> [B, H, T, hd].

    On CUDA with torch >= 2.5 the shared KV heads are read in place (`enable_gqa`); elsewhere
    they are expanded (on CPU `enable_gqa` takes a slower path: 2x per frame measured).
    """
    n_rep = q.shape[1] // k.shape[1]
    if _NATIVE_GQA and q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_rep > 1)
    return F.scaled_dot_product_attention(
        q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask
    )


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[..., KV, S, hd] -> [..., KV * n_rep, S, hd]; query head h reads KV head h // n_rep."""
    if n_rep == 1:
        return x
    *lead, kv, s, d = x.shape
    return x.unsqueeze(-3).expand(*lead, kv, n_rep, s, d).reshape(*lead, kv * n_rep, s, d)
