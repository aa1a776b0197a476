"""Residual LFQ quantizer: latents <-> codes, with the weight norms fused at load.

The official checkpoint stores every 1x1 convolution as a weight-norm parametrisation
(`parametrizations.weight.original0` = g, `original1` = v, W = g * v / ||v||). We fuse them into
plain matrices once, stack the per-codebook projections, and precompute for decoding a table
`out_proj_i(codebook_i)` of every code, so decoding one frame is a gather and a sum. The quantizer
always runs in float32 (it is tiny; upstream casts to float too) whatever the codec's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.codec.config import QuantizerSpec
from core.errors import CheckpointError

_G, _V = "parametrizations.weight.original0", "parametrizations.weight.original1"


def official_quantizer_keys(spec: QuantizerSpec) -> list[str]:
    """Every tensor name the official checkpoint has under `quantizer.` (without the prefix)."""
    convs = []
    if spec.input_dim != spec.rvq_dim:
        convs.append("input_proj")
    if spec.output_dim != spec.rvq_dim:
        convs.append("output_proj")
    for i in range(spec.num_quantizers):
        convs += [f"quantizers.{i}.in_proj", f"quantizers.{i}.out_proj"]
    keys = [f"{c}.{s}" for c in convs for s in (_G, _V, "bias")]
    return keys + [f"quantizers.{i}.codebook.weight" for i in range(spec.num_quantizers)]


def _fuse(tensors: dict[str, torch.Tensor], name: str, out_dim: int, in_dim: int) -> torch.Tensor:
    """W = g * v / ||v|| with the norm over all dims but the output one -> [out, in]."""
    g, v = tensors[f"{name}.{_G}"].float(), tensors[f"{name}.{_V}"].float()
    if g.shape != (out_dim, 1, 1) or v.shape != (out_dim, in_dim, 1):
        raise CheckpointError(
            f"quantizer.{name}: weight-norm shapes g{tuple(g.shape)} v{tuple(v.shape)}, expected "
            f"g({out_dim}, 1, 1) v({out_dim}, {in_dim}, 1)"
        )
    return (g * v / v.norm(dim=(1, 2), keepdim=True)).squeeze(-1)


def _bias(tensors: dict[str, torch.Tensor], name: str, dim: int) -> torch.Tensor:
    b = tensors[f"{name}.bias"].float()
    if b.shape != (dim,):
        raise CheckpointError(
            f"quantizer.{name}.bias has shape {tuple(b.shape)}, expected ({dim},)"
        )
    return b


class ResidualLFQ(nn.Module):
    """Codes Long[T, nq] <-> latents [T, D] with fused, stacked parameters."""

    def __init__(self, spec: QuantizerSpec) -> None:
        super().__init__()
        self.spec = spec
        q, cs, cd, r = spec.num_quantizers, spec.codebook_size, spec.codebook_dim, spec.rvq_dim

        def p(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(shape), requires_grad=False)

        self.input_proj = nn.Linear(spec.input_dim, r) if spec.input_dim != r else None
        self.output_proj = nn.Linear(r, spec.output_dim) if spec.output_dim != r else None
        self.in_w, self.in_b = p(q, cd, r), p(q, cd)  # per codebook: rvq -> codebook_dim
        self.out_w, self.out_b = p(q, r, cd), p(q, r)  # per codebook: codebook_dim -> rvq
        self.codebook = p(q, cs, cd)
        # Derived on load (not saved): decode table and unit-norm codebook for the nearest search.
        self.register_buffer("table", torch.zeros(q, cs, r), persistent=False)
        self.register_buffer("unit_codebook", torch.zeros(q, cs, cd), persistent=False)

    def load_official(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fill from official `quantizer.*` tensors (prefix removed); fuses the weight norms."""
        s = self.spec
        with torch.no_grad():
            for name, lin, o, i in (
                ("input_proj", self.input_proj, s.rvq_dim, s.input_dim),
                ("output_proj", self.output_proj, s.output_dim, s.rvq_dim),
            ):
                if lin is not None:
                    lin.weight.copy_(_fuse(tensors, name, o, i))
                    lin.bias.copy_(_bias(tensors, name, o))
            for k in range(s.num_quantizers):
                pre = f"quantizers.{k}"
                self.in_w[k] = _fuse(tensors, f"{pre}.in_proj", s.codebook_dim, s.rvq_dim)
                self.in_b[k] = _bias(tensors, f"{pre}.in_proj", s.codebook_dim)
                self.out_w[k] = _fuse(tensors, f"{pre}.out_proj", s.rvq_dim, s.codebook_dim)
                self.out_b[k] = _bias(tensors, f"{pre}.out_proj", s.rvq_dim)
                cb = tensors[f"{pre}.codebook.weight"].float()
                if cb.shape != (s.codebook_size, s.codebook_dim):
                    raise CheckpointError(
                        f"quantizer.{pre}.codebook.weight has shape {tuple(cb.shape)}, expected "
                        f"({s.codebook_size}, {s.codebook_dim})"
                    )
                self.codebook[k] = cb
        self.refresh()

    def official_state(self) -> dict[str, torch.Tensor]:
        """Official `quantizer.*` tensors (no prefix): g = ||W|| per row, v = W: g*v/||v|| = W."""
        out: dict[str, torch.Tensor] = {}

        def put(name: str, w: torch.Tensor, b: torch.Tensor) -> None:
            w = w.detach().float().cpu()
            out[f"{name}.{_G}"] = w.norm(dim=1).view(-1, 1, 1).contiguous()
            out[f"{name}.{_V}"] = w.unsqueeze(-1).contiguous()
            out[f"{name}.bias"] = b.detach().float().cpu().contiguous()

        for name, lin in (("input_proj", self.input_proj), ("output_proj", self.output_proj)):
            if lin is not None:
                put(name, lin.weight, lin.bias)
        for k in range(self.spec.num_quantizers):
            put(f"quantizers.{k}.in_proj", self.in_w[k], self.in_b[k])
            put(f"quantizers.{k}.out_proj", self.out_w[k], self.out_b[k])
            out[f"quantizers.{k}.codebook.weight"] = self.codebook[k].detach().float().cpu().clone()
        return out

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the derived buffers after the parameters changed (load, device move)."""
        table = torch.einsum("qcd,qrd->qcr", self.codebook, self.out_w) + self.out_b[:, None]
        self.table = table.contiguous()
        self.unit_codebook = F.normalize(self.codebook, dim=-1)

    def encode(self, latent: torch.Tensor, n_quantizers: int) -> torch.Tensor:
        """latent [T, input_dim] -> codes Long[T, nq]: nearest unit codebook row, then subtract."""
        residual = latent.float()
        if self.input_proj is not None:
            residual = self.input_proj(residual)
        codes = []
        for k in range(n_quantizers):
            z = F.normalize(residual @ self.in_w[k].T + self.in_b[k], dim=-1)
            idx = (z @ self.unit_codebook[k].T).argmax(dim=-1)
            codes.append(idx)
            residual = residual - self.table[k, idx]
        if not codes:
            return torch.zeros(latent.shape[0], 0, dtype=torch.long, device=latent.device)
        return torch.stack(codes, dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes Long[..., nq] -> latent [..., output_dim] (float32) via table gather + sum."""
        nq = codes.shape[-1]
        book = torch.arange(nq, device=codes.device)
        z = self.table[book, codes].sum(dim=-2)  # [..., nq, rvq] -> [..., rvq]
        return self.output_proj(z) if self.output_proj is not None else z
