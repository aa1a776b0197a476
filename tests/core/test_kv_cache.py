"""KVPool bookkeeping: memory follows real context, truncation, overflow, isolation."""

from __future__ import annotations

import pytest
import torch

from core.errors import ContextOverflowError
from core.model import KVPool, MossTTSRealtime
from core.tiny import write_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> MossTTSRealtime:
    path = tmp_path_factory.mktemp("tiny_kv")
    write_tiny_model(path, seed=9)
    return MossTTSRealtime.from_pretrained(path, dtype=torch.float32)


def _rows(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 1024, (n, 17), generator=gen)
    rows[:, 0] %= 420
    return rows


def test_blocks_follow_real_context_and_are_reused(model: MossTTSRealtime):
    """Prevents a pool that reserves a maximum context per conversation (fewer concurrent calls)
    or leaks blocks when conversations end."""
    kv = KVPool(model.config, num_blocks=10, block_size=4, dtype=torch.float32)
    a = kv.new_sequence()
    assert kv.rows_free == 40 and kv.length(a) == 0
    model.forward_rows([_rows(5, 0)], [a], kv)
    assert kv.length(a) == 5 and kv.rows_free == 32  # 2 blocks
    model.forward_rows([_rows(3, 1)], [a], kv)
    assert kv.rows_free == 32  # still fits in 2 blocks
    b = kv.new_sequence()
    model.forward_rows([_rows(12, 2)], [b], kv)
    assert kv.rows_free == 20
    kv.free(a)
    assert kv.rows_free == 28 and kv.sequences() == [b]
    with pytest.raises(KeyError):
        kv.length(a)


def test_truncate_then_append_equals_fresh_prefill(model: MossTTSRealtime):
    """Prevents stale keys after an interruption: cutting a sequence back and appending new rows
    must equal prefilling the kept rows plus the new rows from scratch."""
    kv = KVPool(model.config, num_blocks=16, block_size=4, dtype=torch.float32)
    s = kv.new_sequence()
    history, new = _rows(13, 3), _rows(4, 4)
    model.forward_rows([history], [s], kv)
    kv.truncate(s, 6)
    assert kv.length(s) == 6 and kv.rows_free == (16 - 2) * 4
    after = model.forward_rows([new], [s], kv)
    fresh = kv.new_sequence()
    expected = model.forward_rows([torch.cat([history[:6], new])], [fresh], kv)
    assert (after - expected).abs().max().item() < 1e-6
    with pytest.raises(ValueError):
        kv.truncate(s, 11)


def test_overflow_raises_and_changes_nothing(model: MossTTSRealtime):
    """Prevents a half-applied batch when the pool is full: the error is typed and no sequence
    grows, so the engine can evict or rebuild and retry."""
    kv = KVPool(model.config, num_blocks=4, block_size=4, dtype=torch.float32)
    a, b = kv.new_sequence(), kv.new_sequence()
    model.forward_rows([_rows(6, 5)], [a], kv)
    with pytest.raises(ContextOverflowError, match="KV pool exhausted"):
        model.forward_rows([_rows(1, 6), _rows(9, 7)], [a, b], kv)
    assert (kv.length(a), kv.length(b), kv.rows_free) == (6, 0, 8)


def test_bad_batches_raise(model: MossTTSRealtime):
    """Prevents silent corruption from a sequence listed twice or malformed rows."""
    kv = KVPool(model.config, num_blocks=4, block_size=4, dtype=torch.float32)
    a = kv.new_sequence()
    with pytest.raises(ValueError, match="twice"):
        model.forward_rows([_rows(1, 0), _rows(1, 1)], [a, a], kv)
    with pytest.raises(ValueError, match="rows must be"):
        model.forward_rows([torch.zeros(2, 16, dtype=torch.long)], [a], kv)
    with pytest.raises(ValueError):
        KVPool(model.config, num_blocks=0)


def test_out_of_range_ids_raise_before_touching_the_cache(model: MossTTSRealtime):
    """Prevents an out-of-vocab id from crashing the device (CUDA assert) or corrupting KV."""
    kv = KVPool(model.config, num_blocks=4, block_size=4, dtype=torch.float32)
    a = kv.new_sequence()
    bad_text, bad_code = _rows(2, 0), _rows(2, 1)
    bad_text[1, 0] = 448
    bad_code[0, 5] = 1027
    with pytest.raises(ValueError, match="text ids"):
        model.forward_rows([bad_text], [a], kv)
    with pytest.raises(ValueError, match="audio codes"):
        model.forward_rows([bad_code], [a], kv)
    assert kv.length(a) == 0


def test_varlen_batch_equals_each_sequence_alone(model: MossTTSRealtime):
    """Prevents one conversation's rows from leaking into another's attention (or its grouped
    query heads reading the wrong KV head): a batch mixing prefill chunks of different lengths,
    1-row decode steps and sequences whose blocks are scattered over the pool gives every
    sequence exactly the hidden states it gets alone (float64, so only a bug can differ)."""
    double = MossTTSRealtime(model.config).double()
    double.load_state_dict({k: v.double() for k, v in model.state_dict().items()}, assign=True)
    histories = [_rows(n, 20 + n) for n in (0, 3, 9, 14)]
    news = [_rows(n, 40 + n) for n in (7, 1, 5, 1)]
    together = KVPool(double.config, num_blocks=24, block_size=4, dtype=torch.float64)
    seqs = [together.new_sequence() for _ in histories]
    for step in range(14):  # interleaved prefill: each sequence's blocks land all over the pool
        for seq, history in zip(seqs, histories, strict=True):
            if step < len(history):
                double.forward_rows([history[step : step + 1]], [seq], together)
    got = double.forward_rows(news, seqs, together, all_rows=True)
    alone = KVPool(double.config, num_blocks=24, block_size=4, dtype=torch.float64)
    expected = []
    for history, new in zip(histories, news, strict=True):
        seq = alone.new_sequence()
        if len(history):
            double.forward_rows([history], [seq], alone)
        expected.append(double.forward_rows([new], [seq], alone, all_rows=True))
    assert (got - torch.cat(expected)).abs().max().item() < 1e-12


def _seq_kv(kv: KVPool, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys/values of a sequence's rows, gathered through its block table."""
    n, bs = kv.length(seq), kv.block_size
    rows = torch.tensor([kv._tables[seq][i // bs] * bs + i % bs for i in range(n)], dtype=torch.long)
    return kv.k[:, rows].clone(), kv.v[:, rows].clone()


@pytest.mark.parametrize("length", [8, 10])  # on a block boundary, and inside a block
def test_fork_equals_a_fresh_prefill(model: MossTTSRealtime, length: int):
    """Prevents a shared voice prefix that changes what a conversation says: a forked prefix
    plus new rows must give the hidden states of prefilling everything from scratch."""
    kv = KVPool(model.config, num_blocks=16, block_size=4, dtype=torch.float32)
    src = kv.new_sequence()
    prefix, new = _rows(13, 10), _rows(5, 11)
    model.forward_rows([prefix], [src], kv)
    free = kv.rows_free
    fork = kv.fork(src, length)
    assert kv.length(fork) == length
    assert kv.rows_free == free - (4 if length % 4 else 0)  # only a partial block is copied
    got = model.forward_rows([new], [fork], kv)
    fresh = kv.new_sequence()
    expected = model.forward_rows([torch.cat([prefix[:length], new])], [fresh], kv)
    assert (got - expected).abs().max().item() < 1e-6


def test_writing_to_a_fork_or_its_source_never_changes_the_other(model: MossTTSRealtime):
    """Prevents one conversation corrupting another's cached voice prefix through a shared
    block (appends, and appends after truncating into a shared block, are copy-on-write)."""
    kv = KVPool(model.config, num_blocks=24, block_size=4, dtype=torch.float32)
    src = kv.new_sequence()
    model.forward_rows([_rows(8, 12)], [src], kv)
    before = _seq_kv(kv, src)
    fork = kv.fork(src, 8)
    model.forward_rows([_rows(3, 13)], [fork], kv)
    kv.truncate(fork, 6)  # now ends inside a block the source also holds
    model.forward_rows([_rows(4, 14)], [fork], kv)
    after = _seq_kv(kv, src)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    kv.truncate(src, 5)  # the source writes into a shared block: the fork keeps its rows
    fork_before = _seq_kv(kv, fork)
    model.forward_rows([_rows(2, 15)], [src], kv)
    fork_after = _seq_kv(kv, fork)
    assert torch.equal(fork_before[0], fork_after[0]) and torch.equal(fork_before[1], fork_after[1])


def test_shared_blocks_return_to_the_pool_with_their_last_holder(model: MossTTSRealtime):
    """Prevents leaked or double-freed blocks when forks and their source end in any order."""
    kv = KVPool(model.config, num_blocks=8, block_size=4, dtype=torch.float32)
    src = kv.new_sequence()
    model.forward_rows([_rows(8, 16)], [src], kv)
    a, b = kv.fork(src, 8), kv.fork(src, 4)
    assert kv.rows_free == 24  # nothing copied: both forks end on a block boundary
    kv.free(src)
    assert kv.rows_free == 24  # a and b still hold the blocks
    kv.truncate(a, 4)
    assert kv.rows_free == 28  # block 2 of the prefix had only `a` left
    kv.free(a)
    assert kv.rows_free == 28  # block 1 is still b's
    kv.free(b)
    assert kv.rows_free == 32 and kv.sequences() == []
    assert sorted(kv._free_blocks) == list(range(8))  # each block exactly once


def test_fork_and_copy_on_write_raise_overflow_when_the_pool_is_full(model: MossTTSRealtime):
    """Prevents a fork or a copy-on-write from silently sharing a block it should have copied
    when no block is free: the typed error lets the engine evict and retry."""
    kv = KVPool(model.config, num_blocks=3, block_size=4, dtype=torch.float32)
    src = kv.new_sequence()
    model.forward_rows([_rows(6, 17)], [src], kv)
    a = kv.fork(src, 6)  # copies the partial block: the last free one
    assert kv.rows_free == 0
    with pytest.raises(ContextOverflowError, match="KV pool exhausted"):
        kv.fork(src, 5)
    b = kv.fork(src, 4)  # a full block needs no memory
    kv.truncate(b, 2)
    with pytest.raises(ContextOverflowError, match="KV pool exhausted"):
        model.forward_rows([_rows(1, 18)], [b], kv)  # would have to copy the shared block
    assert kv.length(b) == 2 and kv.length(a) == 6
    with pytest.raises(ValueError):
        kv.fork(src, 7)
