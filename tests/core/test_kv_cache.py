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
