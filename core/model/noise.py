"""Counter-based Gumbel noise for the sampler: randomness as a pure function of its coordinates.

A stateful generator would make a conversation's draws depend on which other conversations share
its batch and where it sits in it. Here the noise of one draw is hash(seed, frame counter,
codebook, vocab id): a chain of murmur3's 32-bit finaliser in exact int64 tensor arithmetic
(the same bits on every device), computed where the logits are without a host sync. Gumbel-max,
argmax(logits/T + Gumbel), samples softmax(logits/T) exactly.

`gumbel_host` is the same function for the CPU sampler's numpy fast path: the hash in uint32
numpy arithmetic (wrapping is the mod 2**32), the logarithms still torch's, so the bits match.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

M32 = 0xFFFFFFFF
_SEED_MIX = 0x9E3779B9
_ID_MUL = 0x632BE5AB


def mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), exact in int64 (no signed overflow)."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & M32


def fmix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser: a bijective avalanche mix."""
    h = h ^ (h >> 16)
    h = mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def frame_keys(seed_lo: Tensor, seed_hi: Tensor, counter: Tensor, rvq: int) -> Tensor:
    """Noise key [B, rvq] = hash(seed, frame counter, codebook) of each row's current frame.

    seed_lo/seed_hi are the low/high 32 bits of each row's seed, counter its frame index [B].
    """
    key = fmix32(seed_lo ^ _SEED_MIX)
    key = fmix32(key ^ seed_hi)
    key = fmix32(key ^ (counter & M32))
    key = fmix32(key ^ ((counter >> 32) & M32))
    codebooks = torch.arange(rvq, device=counter.device, dtype=torch.int64)
    return fmix32(key[:, None] ^ codebooks[None, :])


def frame_keys_host(
    seed_lo: np.ndarray, seed_hi: np.ndarray, counter: np.ndarray, rvq: int
) -> np.ndarray:
    """`frame_keys` for int64 numpy arrays on the CPU, in uint32 arithmetic (the same bits):
    some 25 numpy calls instead of some 60 small torch ops, once per frame (~150 us at tiny
    dimensions, a few percent of a compiled frame)."""
    u32 = np.uint32
    key = _fmix32_host(seed_lo.astype(u32) ^ u32(_SEED_MIX))
    key = _fmix32_host(key ^ seed_hi.astype(u32))
    key = _fmix32_host(key ^ (counter & M32).astype(u32))
    key = _fmix32_host(key ^ ((counter >> 32) & M32).astype(u32))
    return _fmix32_host(key[:, None] ^ np.arange(rvq, dtype=u32)[None, :])


def vocab_hash(vocab: int, device: torch.device) -> Tensor:
    """mul32(vocab id, constant) for every id [V]: the per-id half of the noise hash."""
    return mul32(torch.arange(vocab, device=device, dtype=torch.int64), _ID_MUL)


UNIFORM_BITS = 23  # k + 1 bits must be exact in the float: fp32 has 24, so k = 23


def uniform(h: Tensor, dtype: torch.dtype) -> Tensor:
    """Hash bits -> u = (top 23 bits + 0.5) / 2**23, strictly inside (0, 1) and exact in fp32.

    (24 bits would not do: (2**24 - 1 + 0.5) rounds to 2**24 in fp32, u = 1, and the Gumbel noise
    is +inf, which makes a filtered (-inf) candidate NaN and lets argmax pick it.)
    """
    return ((h >> (32 - UNIFORM_BITS)).to(dtype) + 0.5) / float(1 << UNIFORM_BITS)


def gumbel(keys: Tensor, id_hash: Tensor, dtype: torch.dtype) -> Tensor:
    """Gumbel noise from hash(key, vocab id); keys broadcast against the pre-mixed ids."""
    u = uniform(fmix32((keys + id_hash) & M32), dtype)
    return -torch.log(-torch.log(u))


def _fmix32_host(h: np.ndarray) -> np.ndarray:
    """`fmix32` on uint32 numpy arrays (multiplication wraps mod 2**32 by itself)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel_host(keys: np.ndarray, id_hash: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`gumbel` for uint32 numpy keys/ids on the CPU: a few numpy calls instead of ~20 torch
    ops per draw, bit-identical (integer hash, exact float steps, torch's log)."""
    t = torch.from_numpy(uniform_host(_fmix32_host(keys + id_hash), dtype))
    return torch.log(t).neg_().log_().neg_().numpy()


def uniform_host(h: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`uniform` for uint32 numpy hashes (the same exact steps, so the same bits)."""
    scale = dtype.type(1 << UNIFORM_BITS)
    return ((h >> (32 - UNIFORM_BITS)).astype(dtype) + dtype.type(0.5)) / scale
