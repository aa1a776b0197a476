"""Qwen3 backbone over summed 17-channel row embeddings, attending through a `KVPool` plan."""

from __future__ import annotations

from torch import Tensor, nn

from core.model.config import TransformerConfig
from core.model.kv_cache import PagedContext
from core.model.layers import Block, RMSNorm, rope_cos_sin


class Backbone(nn.Module):
    """Decoder stack + final RMSNorm; no embedding (rows are embedded by the caller), no head."""

    def __init__(self, tc: TransformerConfig) -> None:
        super().__init__()
        self.tc = tc
        self.layers = nn.ModuleList(Block(tc) for _ in range(tc.num_layers))
        self.norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)

    def forward(self, x: Tensor, ctx: PagedContext, *, all_rows: bool = False) -> Tensor:
        """x [N, D] packed new rows -> final-normed hidden of each sequence's last row [B, D]
        (or of every row [N, D] when `all_rows`)."""
        tc = self.tc
        cos, sin = rope_cos_sin(ctx.positions, tc.head_dim, tc.rope_theta, tc.rope_factor, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, ctx, i)
        return self.norm(x if all_rows else x[ctx.last_index])
