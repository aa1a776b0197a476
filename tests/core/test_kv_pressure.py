"""A KV pool smaller than all histories: idle caches are evicted and rebuilt, speaking turns
never fail for memory, and a turn that cannot fit waits, then gets a retryable CapacityError."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from engine_kit import build_engine, load_parts

from core import (
    AdmissionError,
    CapacityError,
    ContextOverflowError,
    Conversation,
    Engine,
    SamplingParams,
    StreamCancelled,
)
from core.engine.stream import TurnStatus, TurnStream
from core.model import KVPool
from core.model.kv_cache import KVPoolExhausted

WORDS = "alpha beta gamma delta echo foxtrot golf hotel india juliet kilo lima mike".split()


@pytest.fixture(scope="module")
def parts(tiny_dirs):
    return load_parts(tiny_dirs)


def make_engine(parts, **overrides) -> Engine:
    return build_engine(parts, **{"max_frames_per_turn": 24, **overrides})


async def wait_until(pred, limit_s=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not pred():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_64_conversations_share_a_pool_far_smaller_than_their_histories(parts):
    """Prevents turns failing with ContextOverflowError ("KV pool exhausted") or StreamFailed
    when many conversations share a small pool: 64 conversations, 16 speaking at once, random
    interruptions and churn (260 blocks; the histories take ~1,400 unshared blocks). Every turn
    ends without an error, idle caches are evicted and rebuilt, and a turn may wait for room
    but none is refused."""
    engine = make_engine(parts, max_streams=16, max_conversations=64, kv_num_blocks=260,
                         lead_s=1.5, kv_wait_s=30.0)
    rng = random.Random(7)
    errors: list[BaseException] = []
    speakers = asyncio.Semaphore(16)

    async def one_turn(conv) -> None:
        await conv.add_user_turn(text=" ".join(rng.choices(WORDS, k=rng.randint(2, 8))))
        async with speakers:
            stream = conv.speak()
            stream.push_text(" ".join(rng.choices(WORDS, k=rng.randint(3, 12))))
            stream.end_text()
            cut_at = rng.randint(1, 4) if rng.random() < 0.3 else None
            try:
                async for n, _ in _numbered(stream):
                    if n == cut_at:
                        stream.cancel(played_s=rng.uniform(0.0, 0.4))
                        break
            except Exception as exc:  # every error is a failure of this test
                errors.append(exc)
            if cut_at is None and stream.status is not TurnStatus.FINISHED:
                errors.append(AssertionError(f"turn {stream.turn_id}: {stream.status}"))

    async def dialogue(i: int) -> None:
        conv = engine.conversation(sampling=SamplingParams(seed=i))
        for t in range(5):
            if rng.random() < 0.15:  # churn: the room ends, a new one opens
                conv.close()
                conv = engine.conversation(sampling=SamplingParams(seed=1000 * i + t))
            await one_turn(conv)
        conv.close()

    try:
        await asyncio.wait_for(asyncio.gather(*(dialogue(i) for i in range(64))), 240)
        stats = engine.stats()
        assert errors == []
        assert stats.turns_failed == 0 and stats.capacity_refusals == 0
        assert stats.kv_evictions > 0 and stats.kv_rebuilds > 0
        assert stats.turns_started == 64 * 5
    finally:
        engine.close()


async def _numbered(stream):
    n = 0
    async for chunk in stream:
        n += 1
        yield n, chunk


async def test_a_turn_the_pool_cannot_hold_waits_then_gets_capacity_error(parts):
    """Prevents failing a speaking turn for memory, or blaming the conversation: with room for
    one turn only, a second conversation's turn waits `kv_wait_s`, then ends with the retryable
    CapacityError (an AdmissionError, not a ContextOverflowError) before any audio, while the
    first turn speaks to its end; once it is over the second conversation speaks."""
    engine = make_engine(parts, kv_num_blocks=18, max_frames_per_turn=40, kv_wait_s=0.3)
    try:
        first = engine.conversation(sampling=SamplingParams(seed=1))
        long = first.speak()
        long.push_text("A long sentence with many words that keeps the first turn speaking.")
        await wait_until(lambda: long.frames > 0)  # no end_text yet: it holds its room
        second = engine.conversation(sampling=SamplingParams(seed=2))
        waiting = second.speak()
        waiting.push_text("Me too.")
        waiting.end_text()
        with pytest.raises(CapacityError) as info:
            async for _ in waiting:
                pass
        assert isinstance(info.value, AdmissionError)
        assert not isinstance(info.value, ContextOverflowError)
        assert waiting.frames == 0 and waiting.status is TurnStatus.FAILED
        long.end_text()
        chunks = [c async for c in long]
        assert chunks and long.status is TurnStatus.FINISHED and long.error is None
        retry = second.speak()
        retry.push_text("Me too.")
        retry.end_text()
        assert [c async for c in retry] and retry.status is TurnStatus.FINISHED
        stats = engine.stats()
        assert stats.capacity_refusals == 1 and stats.capacity_waits >= 1
        assert stats.turns_failed == 0  # the refused turn never started
    finally:
        engine.close()


async def _pool_held_by_a_long_turn(engine: Engine) -> tuple[TurnStream, Conversation]:
    """A first turn speaking (its text not ended) that holds the small pool, and a second
    conversation whose turns must ask for room beside it."""
    first = engine.conversation(sampling=SamplingParams(seed=1))
    long = first.speak()
    long.push_text("A sentence that keeps the first turn speaking for a while.")
    await wait_until(lambda: long.frames > 0)
    return long, engine.conversation(sampling=SamplingParams(seed=2))


async def test_a_waiting_turn_starts_when_room_frees_up(parts):
    """Prevents refusing a turn that only had to wait: it starts as soon as the speaking turn
    ends, well within `kv_wait_s`."""
    engine = make_engine(parts, kv_num_blocks=18, max_frames_per_turn=40, kv_wait_s=30.0)
    try:
        long, second = await _pool_held_by_a_long_turn(engine)
        waiting = second.speak()
        waiting.push_text("Me too.")
        waiting.end_text()
        await asyncio.sleep(0.3)
        assert waiting.status is TurnStatus.QUEUED and engine.stats().capacity_waits == 1
        long.end_text()
        assert [c async for c in long]
        assert [c async for c in waiting] and waiting.status is TurnStatus.FINISHED
        assert engine.stats().capacity_refusals == 0
    finally:
        engine.close()


def test_blocks_needed_counts_new_blocks_and_copy_on_write_copies(parts):
    """Prevents evicting too little before a step: `blocks_needed` is exactly what `reserve`
    takes, a copy-on-write copy of a shared partial block included."""
    pool = KVPool(parts[0].config, num_blocks=16, block_size=4, dtype=torch.float32)
    src = pool.new_sequence()
    pool.plan([src], [10])
    fork = pool.fork(src, 8)  # two full shared blocks
    pool.truncate(fork, 6)  # its last block is now shared and partly used
    other = pool.new_sequence()
    for seqs, rows in [([fork], [1]), ([fork, other], [3, 9]), ([src], [2]), ([other], [1])]:
        need = pool.blocks_needed(seqs, rows)
        before = pool.free_blocks
        pool.plan(seqs, rows)
        assert before - pool.free_blocks == need, (seqs, rows)
    assert pool.blocks_needed([fork], [1]) == 0  # its copy is its own now


async def test_pool_exhaustion_is_never_reported_as_context_overflow(parts, monkeypatch):
    """Prevents a full pool at run time (an accounting bug) reaching the caller as the
    conversation's ContextOverflowError: the turn ends with the retryable CapacityError."""
    engine = make_engine(parts)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=3))
        real = engine.kv.reserve

        def full(seq_ids, new_rows):
            raise KVPoolExhausted("KV pool exhausted: need 1 blocks of 16 rows, 0 free")

        monkeypatch.setattr(engine.kv, "reserve", full)
        stream = conv.speak()
        stream.push_text("Hello.")
        stream.end_text()
        with pytest.raises(CapacityError):
            async for _ in stream:
                pass
        monkeypatch.setattr(engine.kv, "reserve", real)
        again = conv.speak()
        again.push_text("Hello.")
        again.end_text()
        assert [c async for c in again]
    finally:
        engine.close()


async def test_cancelled_waiting_turn_leaves_the_queue(parts):
    """Prevents a cancelled turn that waited for room from blocking the turns behind it."""
    engine = make_engine(parts, kv_num_blocks=18, max_frames_per_turn=40, kv_wait_s=30.0)
    try:
        long, second = await _pool_held_by_a_long_turn(engine)
        waiting = second.speak()
        await wait_until(lambda: engine.stats().capacity_waits == 1)
        waiting.cancel()
        with pytest.raises(StreamCancelled):
            await waiting.__anext__()
        long.end_text()
        assert [c async for c in long]
        after = second.speak()
        after.push_text("Now.")
        after.end_text()
        assert [c async for c in after]
    finally:
        engine.close()
