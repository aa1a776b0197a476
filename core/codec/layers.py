"""Codec building blocks: patching, interleaved RoPE, windowed causal attention, projected stages.

Tensors are channel-last `[B, T, D]` inside (upstream is channel-first; patching below keeps its
channel order `d * patch + phase`). Each transformer stage runs two ways with the same weights:
`forward` over a whole clip (windowed causal attention, computed by query blocks so memory stays
bounded), and `step` for a batch of slots, each with its own position and ring KV cache. The ring
holds `window + positions_per_call - 1` keys, so the earliest query of a call still sees its full
window and streaming equals the whole-clip result at every length (upstream's ring of exactly one
window does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.codec.config import TransformerSpec
from core.codec.streaming import SlotState


def patch_down(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, T*p, D] -> [B, T, D*p], channel index d*p + phase (upstream's layout)."""
    b, t, d = x.shape
    assert t % patch == 0, f"length {t} is not a multiple of the patch size {patch}"
    return x.reshape(b, t // patch, patch, d).transpose(2, 3).reshape(b, t // patch, d * patch)


def patch_up(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, T, D*p] -> [B, T*p, D]: the exact inverse of `patch_down`."""
    b, t, dp = x.shape
    return x.reshape(b, t, dp // patch, patch).transpose(2, 3).reshape(b, t * patch, dp // patch)


def rope_tables(
    positions: torch.Tensor, head_dim: int, max_period: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., head_dim/2] in float32 for integer positions (same maths as upstream)."""
    ds = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    angles = positions.float().unsqueeze(-1) * freqs
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x [B, H, T, Dh]; cos/sin broadcast to [.., Dh/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


@dataclass
class AttentionState(SlotState):
    """Ring KV cache of one attention layer: position p lives at ring index p % capacity."""

    k: torch.Tensor  # [S, H, capacity, Dh]
    v: torch.Tensor  # [S, H, capacity, Dh]


@dataclass
class StageState(SlotState):
    """State of one transformer stage: one ring per layer (positions come from the codec state)."""

    layers: list[AttentionState]


@dataclass(frozen=True)
class StepContext:
    """What every layer of a stage shares during one streaming step (computed once per stage)."""

    slots: torch.Tensor  # Long[N]
    contiguous: slice | None  # slots as a slice of the state when they are consecutive
    write_idx: torch.Tensor  # Long[N, m] ring index of each new position
    mask: torch.Tensor  # Bool[N, 1, m, capacity] which ring entries each query may see
    cos: torch.Tensor  # [N, 1, m, Dh/2]
    sin: torch.Tensor


class LayerScale(nn.Module):
    """Learned per-channel residual scale (official name `layer_scale_k.scale`)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class Attention(nn.Module):
    """Causal multi-head self-attention over a sliding window, fused QKV, no biases."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        d = spec.d_model
        self.heads, self.head_dim, self.window = spec.num_heads, spec.head_dim, spec.context
        # ModuleLists of one keep the official names `in_projs.0` / `out_projs.0`.
        self.in_projs = nn.ModuleList([nn.Linear(d, 3 * d, bias=False)])
        self.out_projs = nn.ModuleList([nn.Linear(d, d, bias=False)])

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q, k (rotated), v, each [B, H, T, Dh]."""
        b, t, _ = x.shape
        qkv = self.in_projs[0](x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rope(qkv[0], cos, sin), apply_rope(qkv[1], cos, sin), qkv[2]

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.out_projs[0](y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Whole clip from position 0; queries in blocks so the mask is [blk, blk + window)."""
        q, k, v = self._qkv(x, cos, sin)
        t, w = x.shape[1], self.window
        block = max(w, 256)
        outs = []
        for start in range(0, t, block):
            end = min(t, start + block)
            k0 = max(0, start - w + 1)
            qpos = torch.arange(start, end, device=x.device).view(-1, 1)
            delta = qpos - torch.arange(k0, end, device=x.device).view(1, -1)
            mask = (delta >= 0) & (delta < w)
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, start:end], k[:, :, k0:end], v[:, :, k0:end], attn_mask=mask
                )
            )
        return self._out(torch.cat(outs, dim=2))

    def step(self, x: torch.Tensor, ctx: StepContext, state: AttentionState) -> torch.Tensor:
        """m new positions for each of N slots; writes them into the slots' rings, then attends."""
        q, k, v = self._qkv(x, ctx.cos, ctx.sin)
        rows = ctx.slots.view(-1, 1)
        # Advanced indices on dims 0 and 2 put [N, m] first: the value is [N, m, H, Dh].
        state.k[rows, :, ctx.write_idx] = k.transpose(1, 2)
        state.v[rows, :, ctx.write_idx] = v.transpose(1, 2)
        if ctx.contiguous is not None:
            keys, values = state.k[ctx.contiguous], state.v[ctx.contiguous]
        else:
            keys, values = state.k.index_select(0, ctx.slots), state.v.index_select(0, ctx.slots)
        return self._out(F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask))


class TransformerLayer(nn.Module):
    """Pre-norm block: x + ls1 * attn(norm1 x); x + ls2 * linear2(gelu(linear1(norm2 x)))."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        d = spec.d_model
        self.self_attn = Attention(spec)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.linear1 = nn.Linear(d, spec.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(spec.dim_feedforward, d, bias=False)
        scale = spec.layer_scale
        self.layer_scale_1 = LayerScale(d, scale) if scale is not None else nn.Identity()
        self.layer_scale_2 = LayerScale(d, scale) if scale is not None else nn.Identity()

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale_2(self.linear2(F.gelu(self.linear1(self.norm2(x)))))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._ff(x + self.layer_scale_1(self.self_attn(self.norm1(x), cos, sin)))

    def step(self, x: torch.Tensor, ctx: StepContext, state: AttentionState) -> torch.Tensor:
        return self._ff(x + self.layer_scale_1(self.self_attn.step(self.norm1(x), ctx, state)))


class _Layers(nn.Module):
    """Holder so parameter names read `transformer.layers.{i}` like the official checkpoint."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(spec) for _ in range(spec.num_layers)])


class ProjectedTransformer(nn.Module):
    """input_proj (if widths differ) -> causal windowed transformer -> output_proj (if differ)."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.d_model
        self.input_proj = (
            nn.Linear(spec.input_dimension, d, bias=False) if spec.input_dimension != d else None
        )
        self.transformer = _Layers(spec)
        self.output_proj = (
            nn.Linear(d, spec.output_dimension, bias=False) if spec.output_dimension != d else None
        )

    def _project_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_proj(x) if self.input_proj is not None else x

    def _project_out(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_proj(x) if self.output_proj is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole clip [B, T, D_in] starting at position 0 -> [B, T, D_out]."""
        x = self._project_in(x)
        positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_tables(positions, self.spec.head_dim, self.spec.max_period)
        for layer in self.transformer.layers:
            x = layer(x, cos, sin)
        return self._project_out(x)

    def init_state(self, num_slots: int, per_call: int) -> StageState:
        """Rings of window + per_call - 1 keys: every query of a call keeps its whole window."""
        capacity = self.spec.context + per_call - 1
        ref = self.transformer.layers[0].linear1.weight
        shape = (num_slots, self.spec.num_heads, capacity, self.spec.head_dim)
        return StageState(
            layers=[
                AttentionState(
                    k=torch.zeros(shape, device=ref.device, dtype=ref.dtype),
                    v=torch.zeros(shape, device=ref.device, dtype=ref.dtype),
                )
                for _ in self.transformer.layers
            ]
        )

    def step(
        self,
        x: torch.Tensor,
        first_pos: torch.Tensor,
        slots: torch.Tensor,
        contiguous: slice | None,
        state: StageState,
    ) -> torch.Tensor:
        """x [N, m, D_in] at positions first_pos[n] + (0..m-1) of each slot -> [N, m, D_out]."""
        n, m, _ = x.shape
        capacity = state.layers[0].k.shape[2]
        assert m <= capacity - self.spec.context + 1, "more positions per call than the ring allows"
        qpos = first_pos.view(-1, 1) + torch.arange(m, device=x.device)  # [N, m]
        last = qpos[:, -1:]
        ring = torch.arange(capacity, device=x.device)
        kpos = last - torch.remainder(last - ring, capacity)  # [N, cap] position held at each index
        delta = qpos.unsqueeze(-1) - kpos.unsqueeze(1)  # [N, m, cap]
        mask = (kpos.unsqueeze(1) >= 0) & (delta >= 0) & (delta < self.spec.context)
        cos, sin = rope_tables(qpos, self.spec.head_dim, self.spec.max_period)
        ctx = StepContext(
            slots=slots,
            contiguous=contiguous,
            write_idx=torch.remainder(qpos, capacity),
            mask=mask.unsqueeze(1),
            cos=cos.unsqueeze(1),
            sin=sin.unsqueeze(1),
        )
        x = self._project_in(x)
        for layer, layer_state in zip(self.transformer.layers, state.layers, strict=True):
            x = layer.step(x, ctx, layer_state)
        return self._project_out(x)
