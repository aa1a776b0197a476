"""The system+voice prefix KV is prefilled once per voice and forked by every conversation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from engine_kit import build_engine, load_parts, state_of

from core import Engine, SamplingParams
from core.engine.stream import TurnStatus
from core.voices import Voice

TEXT = "Hello there, this is a shared voice speaking."


@pytest.fixture(scope="module")
def parts(tiny_dirs):
    """Tiny model in float64 (so a different prefill split can never flip a sampled code)."""
    return load_parts(tiny_dirs, torch.float64)


def make_engine(parts, **overrides) -> Engine:
    return build_engine(parts, **{"max_frames_per_turn": 30, **overrides})


def voice(n: int, seed: int) -> Voice:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1024, (n, 16), generator=g)
    return Voice(codes=codes, key=f"test-voice-{seed}", duration_s=n * 0.08)


async def speak(conv, text):
    stream = conv.speak()
    stream.push_text(text)
    stream.end_text()
    chunks = [c async for c in stream]
    assert stream.error is None
    return stream, chunks


async def run_dialogues(engine: Engine, v: Voice, seeds: list[int]):
    """Several conversations with one voice, started together, then a second turn each."""
    logits: dict[int, list[torch.Tensor]] = {}
    engine.trace_logits = lambda turn_id, lg: logits.setdefault(turn_id, []).append(lg)
    convs = [engine.conversation(voice=v, sampling=SamplingParams(seed=s)) for s in seeds]
    first = await asyncio.gather(*(speak(c, f"{TEXT} Number {i}.") for i, c in enumerate(convs)))
    for conv in convs:
        await conv.add_user_turn(text="And then?")
    second = await asyncio.gather(*(speak(c, "Then we talk again.") for c in convs))
    out = []
    for conv, (s1, _), (s2, _) in zip(convs, first, second, strict=True):
        codes = [t.codes for t in state_of(conv).history.turns if t.role == "assistant"]
        out.append((codes, torch.stack(logits[s1.turn_id]), torch.stack(logits[s2.turn_id]),
                    s1.prefilled_rows))
    return out


async def test_same_voice_prefills_its_prefix_once_and_says_the_same(parts):
    """Prevents every new conversation paying the voice prompt's prefill (time to first audio)
    and prevents the shared prefix changing what a conversation says: same seeds give the same
    codes and logits as an engine where each conversation prefills its own prefix."""
    v = voice(30, 1)
    shared, alone = make_engine(parts), make_engine(parts, prefix_cache_voices=0)
    try:
        got = await run_dialogues(shared, v, [11, 12, 13])
        ref = await run_dialogues(alone, v, [11, 12, 13])
        prefix_len = int(shared.builder.system_rows().shape[0]) + 30 + 2  # voice block ~ 32 rows
        st, sa = shared.stats(), alone.stats()
        assert st.prefix_prefills == 1 and st.prefix_forks == 3
        assert sa.prefix_prefills == 0 and sa.prefix_forks == 0
        # Three conversations started at once: the prefix was computed once, not three times.
        saved = sa.prefill_rows_total - st.prefill_rows_total
        assert saved >= 2 * prefix_len
        for (codes, l1, l2, rows), (rcodes, r1, r2, rrows) in zip(got, ref, strict=True):
            assert rows < rrows - prefix_len // 2  # the turn did not prefill the voice prompt
            assert len(codes) == 2 and all(c.shape[0] > 0 for c in codes)
            assert all(torch.equal(a, b) for a, b in zip(codes, rcodes, strict=True))
            torch.testing.assert_close(l1, r1, rtol=0, atol=1e-9)
            torch.testing.assert_close(l2, r2, rtol=0, atol=1e-9)
    finally:
        shared.close()
        alone.close()


async def test_each_voice_gets_its_own_prefix(parts):
    """Prevents one voice's cached prompt leaking into another voice's conversation, including
    after a voice change (the new voice's prefix is forked, not the old one kept)."""
    va, vb = voice(20, 2), voice(24, 3)
    engine = make_engine(parts)
    try:
        a, b, plain = (engine.conversation(voice=va, sampling=SamplingParams(seed=1)),
                       engine.conversation(voice=vb, sampling=SamplingParams(seed=2)),
                       engine.conversation(sampling=SamplingParams(seed=3)))
        await asyncio.gather(speak(a, TEXT), speak(b, TEXT), speak(plain, TEXT))
        assert engine.stats().prefix_prefills == 3

        def voice_codes(conv) -> torch.Tensor:
            rows = state_of(conv).kv_rows()
            return rows[rows[:, 0] == engine.builder.ids.audio_pad_text][:, 1:]

        assert torch.equal(voice_codes(a), va.codes) and torch.equal(voice_codes(b), vb.codes)
        assert voice_codes(plain).shape[0] == 0
        a.set_voice(vb)
        await speak(a, "Now with the other voice.")
        assert torch.equal(voice_codes(a), vb.codes)
        stats = engine.stats()
        assert stats.prefix_prefills == 3 and stats.prefix_forks == 4  # b's prefix was reused
        assert [t.text for t in a.turns] == [TEXT, "Now with the other voice."]
    finally:
        engine.close()


async def test_small_pool_evicts_prefixes_and_conversations_and_serves_everyone(parts):
    """Prevents the prefix cache pinning pool memory: with a pool too small for every
    conversation and voice prefix, idle caches and cached prefixes are evicted (LRU, bounded
    number of voices) and every turn is still served, rebuilt from its rows."""
    voices = [voice(16, 10 + i) for i in range(3)]
    engine = make_engine(parts, kv_num_blocks=30, max_frames_per_turn=20, prefix_cache_voices=2)
    try:
        convs = [engine.conversation(voice=voices[i % 3], sampling=SamplingParams(seed=i))
                 for i in range(5)]
        for conv in convs:
            await speak(conv, "Hello there friend.")
        assert len(engine._loop.prefixes) <= 2  # LRU over voices
        for conv in convs[:3]:  # the oldest were evicted; their next turn rebuilds them
            _, chunks = await speak(conv, "Back again.")
            assert chunks and [t.text for t in conv.turns][-1] == "Back again."
        stats = engine.stats()
        assert stats.turns_failed == 0 and stats.turns_finished == 8
        assert stats.prefix_prefills > 3  # evicted prefixes were prefilled again
        kv = engine.kv
        held = sum(kv.length(s) for s in kv.sequences())
        assert kv.rows_free >= 0 and held > 0
    finally:
        engine.close()


async def test_a_turn_cancelled_while_its_prefix_builds_leaves_the_cache_usable(parts,
                                                                               monkeypatch):
    """Prevents a cancelled first turn from leaving a half-built prefix that later turns of
    that voice wait on forever: the build goes on and later conversations fork it."""
    v = voice(20, 7)
    engine = make_engine(parts, prefill_chunk=16)  # the prefix takes many ticks
    loop, real = engine._loop, engine.model.forward_rows
    conv = engine.conversation(voice=v, sampling=SamplingParams(seed=1))
    stream = conv.speak()
    chunks_in_build = []

    def cancel_mid_build(rows, seq_ids, kv, **kw):  # engine thread: cancel after 1st chunk
        building = {e.seq.seq_id for e in loop.prefixes.building()}
        if building & set(seq_ids):
            chunks_in_build.append(len(seq_ids))
            if len(chunks_in_build) == 1:
                stream.cancel()
        return real(rows, seq_ids, kv, **kw)

    monkeypatch.setattr(engine.model, "forward_rows", cancel_mid_build)
    try:
        stream.push_text(TEXT)
        await asyncio.wait_for(stream.wait(), 30)
        assert stream.status is TurnStatus.CANCELLED and stream.frames == 0
        assert len(chunks_in_build) >= 1
        other = engine.conversation(voice=v, sampling=SamplingParams(seed=2))
        _, chunks = await asyncio.wait_for(speak(other, TEXT), 30)
        assert chunks
        _, chunks = await asyncio.wait_for(speak(conv, TEXT), 30)
        assert chunks and len(chunks_in_build) > 5  # the prefix was built in many chunks
        stats = engine.stats()
        assert stats.prefix_prefills == 1 and stats.prefix_forks == 2
        assert stats.turns_cancelled == 1
    finally:
        engine.close()


async def test_a_failing_prefix_prefill_falls_back_to_per_conversation_prefill(parts, monkeypatch):
    """Prevents a fault in the shared prefix's prefill from failing (or hanging) the turns that
    wait for it: they prefill the prefix themselves and say exactly what they would have."""
    v = voice(20, 8)
    reference = make_engine(parts, prefix_cache_voices=0)
    try:
        ref = await asyncio.gather(
            *(speak(reference.conversation(voice=v, sampling=SamplingParams(seed=s)), TEXT)
              for s in (4, 5)))
    finally:
        reference.close()
    engine = make_engine(parts, prefill_chunk=16)  # the prefix takes several ticks to build
    loop, real = engine._loop, engine.model.forward_rows
    faults = []

    def faulty(rows, seq_ids, kv, **kw):
        # Fail the prefix once both turns wait for it (the second turn may be admitted a tick
        # after the first; one admitted after the failure would rightly build it anew).
        prefixes = {e.seq.seq_id for e in loop.prefixes.entries()}
        if not faults and prefixes & set(seq_ids) and len(loop.active) == 2:
            faults.append(seq_ids)
            raise RuntimeError("injected fault")
        return real(rows, seq_ids, kv, **kw)

    monkeypatch.setattr(engine.model, "forward_rows", faulty)
    try:
        convs = [engine.conversation(voice=v, sampling=SamplingParams(seed=s)) for s in (4, 5)]
        got = await asyncio.gather(*(speak(c, TEXT) for c in convs))
        assert faults and engine.stats().turns_failed == 0
        stats = engine.stats()
        assert stats.prefix_prefills == 0 and stats.prefix_forks == 0
        for (_, chunks), (_, expected) in zip(got, ref, strict=True):
            # The same codes; the fp32 codec may round an LSB differently when the fallback
            # decodes a frame in another batch than the reference did.
            a, b = (np.frombuffer(b"".join(c.pcm for c in x), np.int16).astype(np.int32)
                    for x in (chunks, expected))
            assert chunks and a.shape == b.shape and np.abs(a - b).max() <= 2
        third = engine.conversation(voice=v, sampling=SamplingParams(seed=6))
        await speak(third, TEXT)  # the next conversation builds the prefix again
        assert engine.stats().prefix_prefills == 1 and engine.stats().prefix_forks == 1
    finally:
        engine.close()
