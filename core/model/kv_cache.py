"""Backbone KV cache as a block pool: memory follows each conversation's real context.

The pool holds `num_blocks` blocks of `block_size` rows for every layer. A sequence owns a block
table (list of block ids) that grows as rows are appended and shrinks on `truncate`/`free`, so a
short conversation never reserves the context of a long one. Attention over the pool is varlen
batched: each sequence's blocks are gathered into a padded [B, S] view and SDPA runs with a
causal + length mask. That is the simple, correct version (fine on CPU); a paged kernel can
replace `PagedContext.attend` without touching anything else.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import ContextOverflowError
from core.model.config import ModelConfig
from core.model.layers import attention


class KVPoolExhausted(ContextOverflowError):
    """No free block for an append or a copy. The engine keeps room for every speaking turn
    and evicts idle caches first, so it never lets this reach a caller as a context overflow."""


class KVPool:
    """Block pool of backbone keys/values with per-sequence block tables."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        num_blocks: int,
        block_size: int = 64,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}"
            )
        tc = config.backbone
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.n_kv, self.head_dim = tc.num_kv_heads, tc.head_dim
        shape = (tc.num_layers, num_blocks * block_size, tc.num_kv_heads, tc.head_dim)
        # Flat row storage: row r of block b lives at b * block_size + r.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0
        # Blocks held by more than one sequence (after `fork`): block -> extra holders. A shared
        # block is never written; it returns to the free list when its last holder lets go.
        self._shared: dict[int, int] = {}

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def rows_free(self) -> int:
        """Rows that can still be appended by new blocks (partly filled blocks not counted)."""
        return len(self._free_blocks) * self.block_size

    def new_sequence(self) -> int:
        """Register an empty sequence; blocks are taken only when rows are appended."""
        seq_id = self._next_id
        self._next_id += 1
        self._tables[seq_id] = []
        self._lengths[seq_id] = 0
        return seq_id

    def free(self, seq_id: int) -> None:
        """Return all blocks of `seq_id` to the pool and forget it."""
        self._check(seq_id)
        self._release(self._tables.pop(seq_id))
        del self._lengths[seq_id]

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep only the first `length` rows of `seq_id` (e.g. after an interruption)."""
        self._check(seq_id)
        if not 0 <= length <= self._lengths[seq_id]:
            raise ValueError(
                f"cannot truncate sequence {seq_id} of {self._lengths[seq_id]} rows to {length}"
            )
        keep = -(-length // self.block_size)
        table = self._tables[seq_id]
        self._release(table[keep:])
        del table[keep:]
        self._lengths[seq_id] = length

    def length(self, seq_id: int) -> int:
        self._check(seq_id)
        return self._lengths[seq_id]

    def sequences(self) -> list[int]:
        return list(self._tables)

    def _check(self, seq_id: int) -> None:
        if seq_id not in self._tables:
            raise KeyError(f"unknown KV sequence {seq_id}")

    def fork(self, src_seq: int, length: int) -> int:
        """A new sequence whose first `length` rows equal `src_seq`'s, without recomputing them.

        Full blocks are shared (reference counted, never written again: copy-on-write in
        `reserve`); only a partly used last block is copied. This is how many conversations
        reuse one prefilled system+voice prefix.

        Raises:
            KVPoolExhausted: no free block for the copied partial block.
        """
        self._check(src_seq)
        if not 0 <= length <= self._lengths[src_seq]:
            raise ValueError(
                f"cannot fork {length} rows of sequence {src_seq} ({self._lengths[src_seq]} rows)"
            )
        full, partial = divmod(length, self.block_size)
        src = self._tables[src_seq]
        table = list(src[:full])
        if partial:
            table.append(self._copy_block(src[full], partial))
        for block in table[:full]:
            self._shared[block] = self._shared.get(block, 0) + 1
        seq_id = self.new_sequence()
        self._tables[seq_id], self._lengths[seq_id] = table, length
        return seq_id

    def _copy_block(self, block: int, rows: int) -> int:
        """A fresh block holding the first `rows` rows of `block` (every layer)."""
        if not self._free_blocks:
            raise KVPoolExhausted(
                f"KV pool exhausted: need 1 block of {self.block_size} rows, 0 free"
            )
        new = self._free_blocks.pop()
        src, dst = block * self.block_size, new * self.block_size
        self.k[:, dst : dst + rows] = self.k[:, src : src + rows]
        self.v[:, dst : dst + rows] = self.v[:, src : src + rows]
        return new

    def _release(self, blocks: list[int]) -> None:
        """Drop one holder of each block; unshared blocks go back to the free list."""
        for block in reversed(blocks):
            extra = self._shared.get(block, 0)
            if extra > 1:
                self._shared[block] = extra - 1
            elif extra == 1:
                del self._shared[block]
            else:
                self._free_blocks.append(block)

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    def table(self, seq_id: int) -> list[int]:
        """The blocks `seq_id` holds, in order (a copy; shared blocks included)."""
        self._check(seq_id)
        return list(self._tables[seq_id])

    def blocks_needed(self, seq_ids: list[int], new_rows: list[int]) -> int:
        """Free blocks `reserve(seq_ids, new_rows)` takes: new blocks plus copy-on-write copies
        (so the engine can evict exactly enough before a step)."""
        needs, copies = self._needs(seq_ids, new_rows)
        return sum(needs) + len(copies)

    def _needs(self, seq_ids: list[int], new_rows: list[int]) -> tuple[list[int], list[int]]:
        needs = []
        for seq_id, n in zip(seq_ids, new_rows, strict=True):
            self._check(seq_id)
            total = -(-(self._lengths[seq_id] + n) // self.block_size)
            needs.append(total - len(self._tables[seq_id]))
        copies = [seq_id for seq_id, n in zip(seq_ids, new_rows, strict=True)
                  if self._writes_shared(seq_id, n)]
        return needs, copies

    def reserve(self, seq_ids: list[int], new_rows: list[int]) -> None:
        """Grow block tables for appending `new_rows[i]` rows to `seq_ids[i]`; all or nothing."""
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a sequence appears twice in one batch: {seq_ids}")
        needs, copies = self._needs(seq_ids, new_rows)
        if sum(needs) + len(copies) > len(self._free_blocks):
            raise KVPoolExhausted(
                f"KV pool exhausted: need {sum(needs) + len(copies)} blocks of "
                f"{self.block_size} rows, {len(self._free_blocks)} free"
            )
        for seq_id in copies:  # copy-on-write: a shared partly used last block gets its own copy
            table = self._tables[seq_id]
            old = table[-1]
            table[-1] = self._copy_block(old, self._lengths[seq_id] % self.block_size)
            self._release([old])
        for seq_id, need in zip(seq_ids, needs, strict=True):
            self._tables[seq_id].extend(self._free_blocks.pop() for _ in range(need))

    def _writes_shared(self, seq_id: int, new_rows: int) -> bool:
        """Appending would write into a partly used block that another sequence also holds."""
        table = self._tables[seq_id]
        return (new_rows > 0 and self._lengths[seq_id] % self.block_size != 0
                and table[-1] in self._shared)

    def plan(self, seq_ids: list[int], new_rows: list[int]) -> PagedContext:
        """Reserve space and build the attention plan for one varlen batch.

        Lengths advance here; if the forward that uses the plan fails, `truncate` back. Index
        lists are built in Python and become tensors in one call each (a per-sequence tensor op
        costs more than the whole list at these sizes); every layer reuses them.
        """
        self.reserve(seq_ids, new_rows)
        bs, dev = self.block_size, self.device
        starts = [self._lengths[s] for s in seq_ids]
        totals = [st + n for st, n in zip(starts, new_rows, strict=True)]
        max_new, max_total = max(new_rows), max(totals)
        batch = len(seq_ids)
        max_blocks = -(-max_total // bs)
        # Block table of every sequence, padded with block 0 (masked out).
        table_rows = [self._tables[s][:max_blocks] for s in seq_ids]
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in table_rows],
                              dtype=torch.int64)
        single = max_new == 1  # one new row per sequence: packed queries are the padded ones
        if single:
            positions_list, seq_index, q_pos_list, q_index = starts, list(range(batch)), starts, None
        else:
            positions_list = [p for st, n in zip(starts, new_rows, strict=True)
                              for p in range(st, st + n)]
            seq_index = [i for i, n in enumerate(new_rows) for _ in range(n)]
            # Query (i, j) is new row j of sequence i; padded queries sit at position 0 (never NaN).
            q_pos_list = [[st + j if j < n else 0 for j in range(max_new)]
                          for st, n in zip(starts, new_rows, strict=True)]
            q_index = [i * max_new + j for i, n in enumerate(new_rows) for j in range(n)]
        positions = torch.tensor(positions_list, dtype=torch.int64)
        # physical row of each new token: its block's first row + its offset in the block
        slots = tables[torch.tensor(seq_index), positions // bs] * bs + positions % bs
        q_pos = torch.tensor(q_pos_list, dtype=torch.int64).view(batch, max_new)
        mask = torch.arange(max_total)[None, None, :] <= q_pos[:, :, None]  # causal, within length
        for s, total in zip(seq_ids, totals, strict=True):
            self._lengths[s] = total
        last = list(itertools.accumulate(new_rows))
        return PagedContext(
            pool=self,
            positions=positions.to(dev),
            slots=slots.to(dev),
            seq_len=max_total,
            mask=mask[:, None].to(dev),
            q_index=None if q_index is None else torch.tensor(q_index).to(dev),
            max_new=max_new,
            last_index=(torch.tensor(last) - 1).to(dev),
            blocks=tables.to(dev),
        )


@dataclass
class PagedContext:
    """One varlen batch's plan: where new k/v go, which rows each sequence attends to."""

    pool: KVPool
    positions: Tensor  # [N] absolute position of each new token
    slots: Tensor  # [N] physical pool row each new token is written to
    seq_len: int  # S: the longest context in the batch (shorter ones are masked)
    mask: Tensor  # [B, 1, T, S] bool: query t may read key s
    q_index: Tensor | None  # [N] flat padded query slot (b * T + t); None when T == 1 (identity)
    max_new: int  # T: the longest new-row run in the batch
    last_index: Tensor  # [B] packed index of each sequence's last new token
    blocks: Tensor  # [B, S / block_size] block table of each sequence (padded with block 0)
    # CPU, built on the first layer and reused by the others: the additive float mask, its rows
    # repeated for the query heads that share a KV head.
    _float_mask: Tensor | None = field(default=None, repr=False)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        pool = self.pool
        pool.k[layer].index_copy_(0, self.slots, k.to(pool.k.dtype))
        pool.v[layer].index_copy_(0, self.slots, v.to(pool.v.dtype))
        batch, n_heads, head_dim = self.blocks.shape[0], q.shape[1], q.shape[2]
        if self.q_index is None:  # T == 1: token b is query b already
            qp = q.view(batch, 1, n_heads, head_dim)
        else:  # index_copy / index_select rather than boolean masks: no host sync on CUDA
            qp = q.new_zeros(batch * self.max_new, n_heads, head_dim)
            qp = qp.index_copy_(0, self.q_index, q).view(batch, self.max_new, n_heads, head_dim)
        if q.is_cuda:
            keys = self._gather(pool.k[layer], q.dtype)
            values = self._gather(pool.v[layer], q.dtype)
            out = attention(qp.transpose(1, 2), keys, values, self.mask)
        else:
            out = self._attend_cpu(layer, qp.transpose(1, 2))
        out = out.transpose(1, 2).reshape(batch * self.max_new, n_heads, head_dim)
        return out if self.q_index is None else out.index_select(0, self.q_index)

    def _attend_cpu(self, layer: int, q: Tensor) -> Tensor:
        """SDPA over whole blocks gathered once per tensor, each KV head's query heads side by
        side as extra query rows (the GQA fold): no per-row index and no `repeat_kv` copy, and
        the bool mask made additive once, not per layer. q [B, H, T, hd] -> [B, H, T, hd]."""
        pool = self.pool
        batch, n_heads, t, head_dim = q.shape
        n_rep = n_heads // pool.n_kv
        if self._float_mask is None:
            mask = torch.zeros(self.mask.shape, dtype=q.dtype, device=q.device)
            mask.masked_fill_(~self.mask, float("-inf"))
            # [B, 1, T, S] -> [B, 1, n_rep * T, S]; one row already serves all heads when T == 1
            self._float_mask = mask.repeat(1, 1, n_rep, 1) if t > 1 else mask
        grouped = q.reshape(batch, pool.n_kv, n_rep * t, head_dim)
        out = F.scaled_dot_product_attention(
            grouped, self._gather(pool.k[layer], q.dtype), self._gather(pool.v[layer], q.dtype),
            attn_mask=self._float_mask,
        )
        return out.view(batch, n_heads, t, head_dim)

    def _gather(self, store: Tensor, dtype: torch.dtype) -> Tensor:
        """One layer's pool [rows, KV, hd] -> each sequence's context [B, KV, S, hd]."""
        pool = self.pool
        batch, seq = self.blocks.shape[0], self.seq_len
        blocks = store.view(-1, pool.block_size, pool.n_kv, pool.head_dim)
        picked = blocks.index_select(0, self.blocks.view(-1)).view(batch, -1, pool.n_kv,
                                                                  pool.head_dim)
        return picked[:, :seq].transpose(1, 2).to(dtype)
