"""Depth ("local") transformer: turns one backbone hidden state into the 16 codes of a frame.

Step 0 reads the backbone hidden itself at position 0; step i reads the embedding of code i-1
(table i-1 of 15) at position i; head i gives codebook i's logits. Every frame starts from a
fresh 16-position cache (upstream does the same: nothing carries over between frames). All rows
of a batch advance together, so one call per codebook step serves every active stream.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.model.config import ModelConfig
from core.model.layers import Block, RMSNorm, rope_cos_sin


class FrameCache:
    """Frame-local KV cache [layers, B, KV, 16, hd]; position i is written at step i.

    Attention folds the query heads that share a KV head into extra query rows ([B, KV, n_rep,
    hd] against [B, KV, i+1, hd]): keys are read in place, never repeated per head.
    """

    def __init__(
        self,
        layers: int,
        batch: int,
        n_kv: int,
        steps: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.k = torch.empty(layers, batch, n_kv, steps, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.step = 0

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        i = self.step
        self.k[layer, :, :, i] = k
        self.v[layer, :, :, i] = v
        batch, n_heads, head_dim = q.shape
        n_kv = k.shape[1]
        keys, values = self.k[layer, :, :, : i + 1], self.v[layer, :, :, : i + 1]
        # every query may see every earlier position: no mask needed
        out = F.scaled_dot_product_attention(
            q.view(batch, n_kv, n_heads // n_kv, head_dim), keys, values
        )
        return out.view(batch, n_heads, head_dim)


class StaticFrameCache:
    """The frame cache of a traced step (`Depth.codebook_step`): every one of the 16 positions is
    always there and the ones not yet written are masked, and the position is a tensor, so one
    graph with fixed shapes serves every step of a frame. Caches are values in and out (no
    in-place writes into a caller's tensor). Attention is written out, not SDPA: inductor fuses
    it over the 16 keys into its own kernels, where SDPA's CPU kernel is a fixed call per
    layer (a compiled frame 3-4% faster, measured)."""

    def __init__(self, k: Tensor, v: Tensor, position: Tensor) -> None:
        self.k, self.v = list(k.unbind(0)), list(v.unbind(0))
        self.position = position  # Long[1]
        self.visible = (torch.arange(k.shape[3], device=k.device) <= position)[None, :]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.k[layer] = self.k[layer].index_copy(2, self.position, k[:, :, None])
        self.v[layer] = self.v[layer].index_copy(2, self.position, v[:, :, None])
        batch, n_heads, head_dim = q.shape
        n_kv = k.shape[1]
        query = q.view(batch, n_kv, n_heads // n_kv, head_dim)
        scores = (query @ self.k[layer].transpose(-1, -2)) * head_dim**-0.5
        weights = scores.masked_fill(~self.visible, float("-inf")).softmax(dim=-1)
        return (weights @ self.v[layer]).view(batch, n_heads, head_dim)

    def tensors(self) -> tuple[Tensor, Tensor]:
        return torch.stack(self.k), torch.stack(self.v)


# sample(logits [B, V] fp32, codebook) -> codes [B]
CodeSampler = Callable[[Tensor, int], Tensor]


class Depth(nn.Module):
    """Local transformer + 15 code embeddings + 16 codebook heads (stacked tensors)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        tc = config.local
        self.tc, self.rvq = tc, config.rvq
        d, v = tc.hidden_size, config.audio_vocab_size
        self.embeds = nn.Parameter(torch.empty(config.rvq - 1, v, d))  # input of step i: table i-1
        self.layers = nn.ModuleList(Block(tc) for _ in range(tc.num_layers))
        self.norm = RMSNorm(d, tc.rms_norm_eps)
        self.heads = nn.Parameter(torch.empty(config.rvq, v, d))  # head i -> codebook i
        self._rope: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor, Tensor]]] = {}

    def rope_table(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin [16, hd] of the 16 local positions, built once per device and dtype."""
        key = (device, dtype)
        if key not in self._rope:
            tc = self.tc
            with torch.inference_mode(False):  # normal tensors: usable in and out of inference
                positions = torch.arange(self.rvq, device=device)
                self._rope[key] = rope_cos_sin(
                    positions, tc.head_dim, tc.rope_theta, tc.rope_factor, dtype
                )
        return self._rope[key]

    def _rope_steps(self, device: torch.device, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """cos/sin [1, hd] of each of the 16 local positions."""
        cos, sin = self.rope_table(device, dtype)
        return [(cos[i : i + 1], sin[i : i + 1]) for i in range(self.rvq)]

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Zeroed keys (or values) [layers, B, KV, 16, hd] for `codebook_step`."""
        tc = self.tc
        return torch.zeros(tc.num_layers, batch, tc.num_kv_heads, self.rvq, tc.head_dim,
                           device=device, dtype=dtype)

    def codebook_step(
        self, x: Tensor, k: Tensor, v: Tensor, codebook: Tensor, rope: tuple[Tensor, Tensor],
        head: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Step `codebook` (Long[1]) with tensor caches: (x [B, D], k, v) -> (logits [B, V] in
        at least fp32, k, v). The same maths as a step of `forward`, traceable with fixed
        shapes (the codebook picks rope and cache position by index, not by Python). `head` is
        `heads[codebook]`, picked by the caller as a view: a gather by tensor index inside the
        step would copy the [V, D] weight every step (at tiny dimensions a quarter of the step)."""
        batch = x.shape[0]
        cache = StaticFrameCache(k, v, codebook)
        cos = rope[0].index_select(0, codebook).expand(batch, -1)
        sin = rope[1].index_select(0, codebook).expand(batch, -1)
        for j, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, j)
        h = self.norm(x)
        logits = F.linear(h, head)
        return (logits.to(torch.promote_types(h.dtype, torch.float32)), *cache.tensors())

    def embed_code(self, codes: Tensor, codebook: Tensor) -> Tensor:
        """The next step's input: codes [B] of `codebook` (Long[1]) through table `codebook`
        (the last codebook has no table; its rows are clamped to the previous one, unused)."""
        tables = self.embeds.flatten(0, 1)
        offset = codebook.clamp(max=self.rvq - 2) * self.embeds.shape[1]
        return F.embedding(codes + offset, tables)

    def step(self, x: Tensor, cache: FrameCache, cos: Tensor, sin: Tensor) -> Tensor:
        """One local position for every row: x [B, D] -> normed hidden [B, D]."""
        for j, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, j)
        cache.step += 1
        return self.norm(x)

    def forward(
        self, hidden: Tensor, sample: CodeSampler, logits_out: Tensor | None = None
    ) -> Tensor:
        """hidden [B, D] -> codes [B, 16]; optional `logits_out` [B, 16, V] gets raw logits."""
        tc, batch = self.tc, hidden.shape[0]
        cache = FrameCache(
            tc.num_layers,
            batch,
            tc.num_kv_heads,
            self.rvq,
            tc.head_dim,
            hidden.device,
            hidden.dtype,
        )
        rope = self._rope_steps(hidden.device, hidden.dtype)
        codes = torch.empty(batch, self.rvq, dtype=torch.long, device=hidden.device)
        x = hidden
        for i in range(self.rvq):
            cos, sin = rope[i]
            h = self.step(x, cache, cos.expand(batch, -1), sin.expand(batch, -1))
            logits = F.linear(h, self.heads[i]).to(torch.promote_types(h.dtype, torch.float32))
            if logits_out is not None:
                logits_out[:, i] = logits
            codes[:, i] = sample(logits, i)
            if i + 1 < self.rvq:
                x = F.embedding(codes[:, i], self.embeds[i])
        return codes
