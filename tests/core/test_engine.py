"""The shared engine on the tiny checkpoint: streaming, batching, context, limits, faults."""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import numpy as np
import pytest
import torch
from engine_kit import build_engine, load_parts, state_of

from core import (
    AdmissionError,
    ContextOverflowError,
    EngineClosed,
    SamplingParams,
    StreamCancelled,
    StreamFailed,
    TextTooLongError,
)
from core.engine.inbox import Inbox
from core.engine.stream import TurnStatus
from core.text import IncrementalTokenizer, normalize_text

TEXT = "Hello there, this is a test. How are you today?"


@pytest.fixture(scope="module")
def parts(tiny_dirs):
    return load_parts(tiny_dirs)


make_engine = build_engine


async def speak(conv, text, *, deltas=1):
    """Push `text` in `deltas` pieces, end it, and collect every chunk."""
    stream = conv.speak()
    step = max(1, -(-len(text) // deltas))
    for i in range(0, len(text), step):
        stream.push_text(text[i : i + step])
    stream.end_text()
    chunks = [c async for c in stream]
    return stream, chunks


async def wait_until(pred, limit_s=10.0):
    """Poll an engine-side condition (the engine thread updates it) with a hard limit."""
    deadline = time.monotonic() + limit_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def frames_of(conv, index=-1) -> torch.Tensor:
    """The codes the context recorded for a turn (engine internals, for exactness checks)."""
    return state_of(conv).history.turns[index].codes


async def test_one_turn_streams_chunks_with_words(parts):
    """The basic promise: text in, 24 kHz int16 chunks out, first chunk after one frame, words
    that add up to the text and never run ahead of the audio."""
    engine = make_engine(parts)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=3))
        stream, chunks = await speak(conv, TEXT, deltas=7)
        await asyncio.wait_for(stream.wait(), 5)  # already over: returns at once
        assert stream.status is TurnStatus.FINISHED and stream.error is None and stream.done
        assert chunks[0].duration_s == pytest.approx(0.08) and chunks[0].start_s == 0
        assert chunks[-1].final and not any(c.final for c in chunks[:-1])
        t = 0.0
        for c in chunks:
            assert c.sample_rate == 24000 and c.start_s == pytest.approx(t)
            assert c.num_samples == round(c.duration_s * 24000) and c.num_samples % 1920 == 0
            t += c.duration_s
            for w in c.words:
                assert w.end_s <= c.start_s + c.duration_s + 1e-6
        words = [w for c in chunks for w in c.words]
        assert "".join(w.word for w in words) == TEXT
        assert all(a.end_s <= b.start_s + 1e-9 for a, b in zip(words, words[1:], strict=False))
        assert conv.turns[-1].role == "assistant" and conv.turns[-1].text == TEXT
        assert conv.turns[-1].frames == round(t / 0.08) == stream.frames
        pcm = np.frombuffer(b"".join(c.pcm for c in chunks), dtype="<i2")
        assert pcm.size and np.abs(pcm).max() > 0
        stats = engine.stats()
        assert stats.turns_finished == 1 and stats.frames_total >= stream.frames
        assert stats.ttfa_p50_s is not None and stream.ttfa_s is not None
    finally:
        engine.close()


async def test_batched_equals_single_stream_in_float64(parts):
    """Batching must not change what a conversation says: same codes alone or among 15 others
    with different prompts and lengths (float64, so no tie can flip)."""
    model, codec, tok = parts
    model64 = copy.deepcopy(model).to(torch.float64)
    seeds_texts = [(100 + i, f"Stream {i} says: " + "word " * (i % 5) + "done.") for i in range(16)]

    async def run(indices):
        engine = make_engine(parts, model=model64, max_streams=16, max_conversations=16,
                             kv_num_blocks=2048)
        logits: dict[int, list[torch.Tensor]] = {}
        engine.trace_logits = lambda turn_id, lg: logits.setdefault(turn_id, []).append(lg)
        try:
            convs = []
            for i in indices:
                conv = engine.conversation(sampling=SamplingParams(seed=seeds_texts[i][0]))
                if i % 3:
                    await conv.add_user_turn(text="A question " + "x " * i)
                convs.append(conv)
            done = await asyncio.gather(*(speak(c, seeds_texts[i][1], deltas=1 + i % 4)
                                          for c, i in zip(convs, indices, strict=True)))
            return {i: (frames_of(c), torch.stack(logits[s.turn_id]))
                    for c, i, (s, _) in zip(convs, indices, done, strict=True)}
        finally:
            engine.close()

    together = await run(list(range(16)))
    for i in (5, 9):
        codes, logits = (await run([i]))[i]
        assert codes.shape[0] > 1
        assert torch.equal(together[i][0], codes)
        assert logits.dtype == torch.float64 and logits.shape == together[i][1].shape
        torch.testing.assert_close(together[i][1], logits, rtol=0, atol=1e-9)


async def test_engine_matches_the_reference_turn_loop(parts):
    """The batched engine must generate exactly what the single-conversation reference does."""
    from core.model import KVPool, generate_turn
    from core.text import encode_text

    model, codec, tok = parts
    engine = make_engine(parts)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=11))
        await speak(conv, TEXT, deltas=3)
        got = frames_of(conv)
        builder = engine.builder
        kv = KVPool(model.config, num_blocks=64, block_size=16, dtype=model.dtype)
        seq = kv.new_sequence()
        prompt = torch.cat([builder.system_rows(), builder.assistant_prefix_rows(first=True)])
        ref = generate_turn(model, kv, seq, prompt, encode_text(tok, TEXT), SamplingParams(seed=11),
                            max_frames=40, builder=builder)
        assert torch.equal(got, ref.frames)
    finally:
        engine.close()


async def test_second_turn_prefills_only_new_rows_and_equals_from_scratch(parts):
    """Turn 2 must reuse the cache (latency) and still say exactly what a fresh prefill of the
    whole history would (correctness of the reuse)."""
    greedy = SamplingParams(temperature=0.0)
    engine = make_engine(parts)
    try:
        conv = engine.conversation(sampling=greedy)
        await conv.add_user_turn(text="Hi, who are you?")
        s1, _ = await speak(conv, "I am a small test voice.")
        await conv.add_user_turn(text="Nice to meet you.")
        s2, _ = await speak(conv, "Nice to meet you too.")
        builder = engine.builder
        new_rows = (1 + builder.user_rows("Nice to meet you.", None, first=False).shape[0]
                    + builder.assistant_prefix_rows(first=False).shape[0])
        lead = min(12, len(engine.tokenizer("Nice to meet you too.", add_special_tokens=False)
                              ["input_ids"]))
        assert s2.prefilled_rows == new_rows + lead  # EOS row of turn 1 + user + prefix + lead
        assert s1.prefilled_rows > s2.prefilled_rows

        fresh = engine.conversation(sampling=greedy)
        state_of(fresh).history.turns = [copy.copy(t) for t in state_of(conv).history.turns[:-1]]
        s3, _ = await speak(fresh, "Nice to meet you too.")
        assert s3.prefilled_rows > s2.prefilled_rows  # the whole history
        assert torch.equal(frames_of(fresh), frames_of(conv))
    finally:
        engine.close()


LONG_TEXT = "one two three four five six seven eight nine ten " * 4


async def _cancel_at_third_chunk(conv, text: str, *, played_s: float):
    """Speak `text` (never ended: the turn is still generating) and cancel it with `played_s`
    when the third chunk arrives; returns the stream and the chunks received."""
    stream = conv.speak()
    stream.push_text(text)
    got = []
    async for chunk in stream:
        got.append(chunk)
        if len(got) == 3:
            stream.cancel(played_s=played_s)
            break
    return stream, got


async def test_cancel_mid_turn_keeps_what_was_heard(parts):
    """An interruption must stop audio at once and leave only the heard part in the context,
    and the next turn must work."""
    engine = make_engine(parts, max_frames_per_turn=200)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=5))
        stream, _ = await _cancel_at_third_chunk(conv, LONG_TEXT, played_s=0.16)
        with pytest.raises(StreamCancelled):
            await stream.__anext__()
        assert stream.done and stream.status is TurnStatus.CANCELLED
        await wait_until(lambda: conv.turns and conv.turns[-1].frames == 2)
        heard = conv.turns[-1].text
        assert LONG_TEXT.startswith(heard) and len(heard) < len(LONG_TEXT) / 2
        s2, chunks = await speak(conv, "Sorry, go on.")
        assert s2.status is TurnStatus.FINISHED and chunks
        assert [t.role for t in conv.turns] == ["assistant", "assistant"]
        assert engine.stats().turns_cancelled == 1
    finally:
        engine.close()


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -0.5])
async def test_cancel_rejects_a_non_finite_or_negative_played_s(parts, bad):
    """Prevents a bad playback position from reaching the engine thread (inf overflowed there
    and the consumer never saw the end of its turn): it raises at once, the turn goes on."""
    engine = make_engine(parts)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=5))
        stream = conv.speak()
        stream.push_text(TEXT)
        stream.end_text()
        with pytest.raises(ValueError, match="played_s"):
            stream.cancel(played_s=bad)
        chunks = [c async for c in stream]
        assert chunks and stream.status is TurnStatus.FINISHED
    finally:
        engine.close()


async def test_cancel_with_a_huge_played_s_keeps_everything_emitted(parts):
    """Prevents an overflow in the heard-frame count: a playback position far past the audio
    (1e308 s, whose frame count overflows a float) keeps every emitted frame, and the stream
    ends."""
    engine = make_engine(parts, max_frames_per_turn=200)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=5))
        stream, got = await _cancel_at_third_chunk(conv, LONG_TEXT, played_s=1e308)
        await asyncio.wait_for(stream.wait(), 10)
        await wait_until(lambda: bool(conv.turns))
        assert conv.turns[-1].frames >= sum(round(c.duration_s / 0.08) for c in got)
    finally:
        engine.close()


async def test_cancel_after_finish_truncates_the_recorded_turn(parts):
    """A late interruption (audio still playing after generation ended) must rewrite the
    context to what was played, and the next turn must prefill from that point."""
    engine = make_engine(parts)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=6))
        s1, chunks = await speak(conv, TEXT)
        total = conv.turns[-1].frames
        assert total > 3
        s1.cancel(played_s=0.24)
        await wait_until(lambda: conv.turns[-1].frames == 3)
        assert TEXT.startswith(conv.turns[-1].text) and conv.turns[-1].text != TEXT
        s1.cancel(played_s=0.0)  # nothing heard at all: the turn leaves the context
        await wait_until(lambda: not conv.turns)
        s2, chunks2 = await speak(conv, "Next.")
        assert chunks2 and s2.status is TurnStatus.FINISHED
        s2b = conv.speak()  # a cancel after the next turn started must not touch turn 1
        s1.cancel(played_s=0.08)
        s2b.cancel()
        await wait_until(lambda: s2b.done)
        assert [t.text for t in conv.turns] == ["Next."]
    finally:
        engine.close()


async def test_a_reply_spoken_as_several_turns_is_cut_where_it_was_heard(parts):
    """A framework speaks one reply as several turns (sentence segments) and learns how much was
    heard only after all were generated: cutting the first segment and dropping the unplayed
    second leaves exactly what was heard, and the next turn works."""
    engine = make_engine(parts)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=8))
        s1, _ = await speak(conv, "The first segment of the reply.")
        s2, _ = await speak(conv, "The second segment.")
        assert [t.role for t in conv.turns] == ["assistant", "assistant"]
        s1.cancel(played_s=0.16)  # playback stopped 0.16 s into segment 1 ...
        s2.cancel(played_s=0.0)  # ... so segment 2 was never heard
        await wait_until(lambda: len(conv.turns) == 1 and conv.turns[0].frames == 2)
        assert "The first segment of the reply.".startswith(conv.turns[0].text)
        s3, chunks = await speak(conv, "Sorry, go on.")
        assert chunks and s3.status is TurnStatus.FINISHED
        assert [t.frames > 0 for t in conv.turns] == [True, True]
    finally:
        engine.close()


async def test_context_overflow_trims_and_keeps_serving(parts):
    """A dialogue longer than the context budget must keep working (oldest turns dropped), and
    a single turn that cannot fit must fail only itself with ContextOverflowError."""
    engine = make_engine(parts, max_frames_per_turn=20)
    system = engine.builder.system_rows().shape[0]
    engine.close()
    engine = make_engine(parts, max_frames_per_turn=20, max_context_rows=system + 180)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=8))
        for i in range(5):
            await conv.add_user_turn(text=f"Question {i}?")
            s, chunks = await speak(conv, f"Answer {i}.")
            assert s.error is None and chunks
        assert state_of(conv).history.trims >= 1
        assert conv.turns[-1].text == "Answer 4." and len(conv.turns) < 10
        await conv.add_user_turn(text="long " * 300)
        s = conv.speak()
        s.end_text()
        with pytest.raises(ContextOverflowError):
            async for _ in s:
                pass
        assert isinstance(s.error, ContextOverflowError)
        other = engine.conversation()
        s2, chunks = await speak(other, "Still here.")
        assert chunks
    finally:
        engine.close()


async def test_admission_errors_are_immediate(parts):
    """A full engine must refuse at once (the caller can shed load), never hang."""
    engine = make_engine(parts, max_streams=2, max_conversations=3)
    try:
        a, b, c = (engine.conversation() for _ in range(3))
        with pytest.raises(AdmissionError):
            engine.conversation()
        sa, sb = a.speak(), b.speak()
        with pytest.raises(AdmissionError):
            c.speak()
        queued = a.speak()  # same conversation: queues behind its active turn, no error
        assert queued.status is TurnStatus.QUEUED
        extra = [a.speak() for _ in range(6)]  # up to max_turns_per_conversation = 8 ...
        with pytest.raises(AdmissionError, match="max_turns_per_conversation"):
            a.speak()  # ... and no unbounded queue behind one conversation
        for s in extra:
            s.cancel()
        for s in (sa, sb):
            s.push_text("Short.")
            s.end_text()
            [x async for x in s]
        queued.push_text("Then me.")
        queued.end_text()
        assert [x async for x in queued]
        assert [t.text for t in a.turns] == ["Short.", "Then me."]
        c.speak().cancel()  # admitted now that the others finished
        c.close()
        engine.conversation().close()  # a closed conversation frees its place
    finally:
        engine.close()


def test_closing_a_conversation_frees_exactly_one_place():
    """Prevents a conversation closed twice (or from two threads at once) from freeing two
    places, which let more than max_conversations in."""
    inbox = Inbox(max_streams=2, max_conversations=2, max_turns_per_conversation=8)
    a, _b = inbox.open_conversation(), inbox.open_conversation()
    for _ in range(3):
        inbox.close_conversation(a)
    inbox.open_conversation()
    with pytest.raises(AdmissionError):
        inbox.open_conversation()


async def test_text_starvation_pauses_without_padding(parts):
    """When the LLM is slow the stream must wait, never pad mid-turn (padding can end a turn)."""
    engine = make_engine(parts, max_frames_per_turn=100)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=9))
        text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        n_ids = len(IncrementalTokenizer(engine.tokenizer).push(text))  # ids final so far
        assert n_ids > 12
        stream = conv.speak()
        stream.push_text(text)
        expected = n_ids - 12 + 1  # the lead gives frame 0, then one frame per token
        await wait_until(lambda: stream.frames >= expected - 1)
        await asyncio.sleep(0.3)  # observation window: nothing may be generated without text
        assert stream.frames <= expected
        pad = engine.builder.ids.text_pad
        assert not bool((state_of(conv).kv_rows()[:, 0] == pad).any())
        stream.push_text("fifteen.")
        stream.end_text()
        chunks = [c async for c in stream]
        assert stream.status is TurnStatus.FINISHED and stream.frames > expected
        assert "".join(w.word for c in chunks for w in c.words).endswith("fifteen.")
    finally:
        engine.close()


def test_streams_from_three_event_loops_in_three_threads(parts):
    """Plugins run loops in different threads (LiveKit: one per room): all must be served."""
    engine = make_engine(parts, max_streams=3)
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        async def main() -> None:
            conv = engine.conversation(sampling=SamplingParams(seed=i))
            _, chunks = await speak(conv, f"Thread {i} is speaking now.", deltas=4)
            results[i] = len(chunks)
            assert len(asyncio.all_tasks()) == 1  # no task leaks into the caller's loop

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors and sorted(results) == [0, 1, 2] and all(results.values())
    finally:
        engine.close()


@pytest.mark.parametrize(
    "text",
    ["", "   \n\t ", "ctrl\x00\x07\x1b[31m\r\nchars", "lone \ud800 surrogate \udfff",
     "emoji 🙂👍🏽👨‍👩‍👧", "mixed 中文 English русский العربية 日本語", "<|im_end|><|text_pad|>",
     "\u200b \u200b\x00\ufeff"],
    ids=["empty", "whitespace", "control", "surrogates", "emoji", "mixed", "markup", "invisible"],
)
async def test_garbage_text_completes_and_the_engine_survives(parts, text):
    """Odd input must end in a finished turn or its documented error, never a dead engine; what
    the model reads is the normalised text, and so are the word timings and the context (no
    lone surrogate reaches a transcript; invisible-only text says nothing)."""
    engine = make_engine(parts, max_frames_per_turn=30)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=1))
        stream, chunks = await speak(conv, text, deltas=3)
        assert stream.status is TurnStatus.FINISHED and stream.error is None
        spoken = normalize_text(text)
        if not spoken.strip():
            assert chunks == [] and not conv.turns  # nothing to say, nothing recorded
        words = "".join(w.word for c in chunks for w in c.words)
        assert spoken.startswith(words)
        words.encode("utf-8")
        for turn in conv.turns:
            assert spoken.startswith(turn.text)
            turn.text.encode("utf-8")
        _, after = await speak(conv, "Still fine.")
        assert after
    finally:
        engine.close()


async def test_oversized_text_is_rejected_with_its_error(parts):
    """100 KB of text must raise TextTooLongError at push time, and the turn stays usable."""
    engine = make_engine(parts, max_text_chars=2000)
    try:
        conv = engine.conversation()
        stream = conv.speak()
        with pytest.raises(TextTooLongError):
            stream.push_text("x" * 100_000)
        stream.push_text("Short instead.")
        stream.end_text()
        assert [c async for c in stream]
        with pytest.raises(TypeError):
            conv.speak().push_text(b"bytes")  # type: ignore[arg-type]
    finally:
        engine.close()


@pytest.mark.parametrize("where", ["backbone", "codec"])
async def test_a_failing_stream_fails_alone(parts, monkeypatch, where):
    """A fault while serving one conversation must fail that stream only; the others finish
    with exactly the audio they would have had (the failed batch is rolled back and retried)."""
    engine = make_engine(parts)
    try:
        clean = engine.conversation(sampling=SamplingParams(seed=21))
        await speak(clean, TEXT)
        expected = frames_of(clean)
        good = engine.conversation(sampling=SamplingParams(seed=21))
        bad = engine.conversation(sampling=SamplingParams(seed=22))
        loop = engine._loop

        def bad_in(seq_ids=None, slots=None) -> bool:
            cs = loop.convs.get(bad.conv_id)
            if seq_ids is not None:
                return cs is not None and cs.seq_id in seq_ids
            return cs is not None and cs.active is not None and cs.active.lease.index in slots

        if where == "backbone":  # fails before any state changed
            real = engine.model.forward_rows

            def faulty(rows, seq_ids, kv, **kw):
                if bad_in(seq_ids=seq_ids):
                    raise RuntimeError("injected fault")
                return real(rows, seq_ids, kv, **kw)

            monkeypatch.setattr(engine.model, "forward_rows", faulty)
        else:  # fails after the KV, sampler history and random counters advanced
            real = loop.runner.decode

            def faulty(codes, slots, state):
                if bad_in(slots=slots.tolist()):
                    raise RuntimeError("injected fault")
                return real(codes, slots, state)

            monkeypatch.setattr(loop.runner, "decode", faulty)
        results = await asyncio.gather(speak(good, TEXT), speak(bad, TEXT), return_exceptions=True)
        assert isinstance(results[1], StreamFailed)
        assert isinstance(results[1].__cause__, RuntimeError)
        stream, chunks = results[0]
        assert stream.status is TurnStatus.FINISHED and chunks
        assert torch.equal(frames_of(good), expected)
        monkeypatch.undo()
        _, chunks = await speak(bad, "Recovered.")  # the failed conversation works again
        assert chunks and engine.stats().turns_failed == 1
    finally:
        engine.close()


async def test_close_ends_every_stream_with_engine_closed(parts):
    """Shutting down must release every waiting consumer with a clear error, not hang them."""
    engine = make_engine(parts)
    conv = engine.conversation()
    stream = conv.speak()
    stream.push_text("This text never ends")  # no end_text: the stream waits for more
    queued = conv.speak()
    await wait_until(lambda: stream.status is TurnStatus.ACTIVE)
    waiter = asyncio.ensure_future(stream.wait())
    await engine.aclose()
    await asyncio.wait_for(waiter, 5)  # a waiter in this loop is released by the engine thread
    for s in (stream, queued):
        with pytest.raises(EngineClosed):
            async for _ in s:
                pass
        assert isinstance(s.error, EngineClosed) and s.done
    with pytest.raises(EngineClosed):
        conv.speak()
    with pytest.raises(EngineClosed):
        engine.conversation()
    with pytest.raises(EngineClosed):
        await conv.add_user_turn(text="hello")
    engine.close()  # idempotent


async def test_lead_cap_paces_generation_to_real_time(parts):
    """With a real-time lead cap a stream must not race ahead of playback (it would waste
    compute that other streams need, and an interruption would discard it)."""
    engine = make_engine(parts, lead_s=0.3, max_frames_per_turn=30)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=2))
        stream = conv.speak()
        stream.push_text("A longer sentence so that the turn lasts a couple of seconds at least.")
        stream.end_text()
        start, emitted = None, 0.0
        async for chunk in stream:
            now = time.monotonic()
            start = start or now
            assert emitted <= (now - start) + 0.3 + 0.25  # lead + one chunk of slack
            emitted += chunk.duration_s
        assert emitted > 0.6 and time.monotonic() - start >= emitted - 0.3 - 0.1
    finally:
        engine.close()


async def test_voice_and_user_audio_go_into_the_context(parts):
    """A voice prompt and user speech must reach the model's context (rows carry their codes)."""
    engine = make_engine(parts)
    try:
        rng = np.random.default_rng(0)
        ref = (0.1 * rng.standard_normal(24000 * 2)).astype(np.float32)
        voice = await engine.load_voice(ref, sample_rate=24000)
        assert await engine.load_voice(ref, sample_rate=24000) is voice  # cached
        conv = engine.conversation(voice=voice, sampling=SamplingParams(seed=4))
        user = (0.1 * rng.standard_normal(16000)).astype(np.float32)
        await conv.add_user_turn(text="Can you hear me?", audio=user, sample_rate=16000)
        assert conv.turns[0].frames == 12  # 1 s at 16 kHz -> 12 whole 80 ms frames
        _, chunks = await speak(conv, "Yes, I can.")
        rows = state_of(conv).kv_rows()
        voice_rows = rows[rows[:, 0] == engine.builder.ids.audio_pad_text][:, 1:]
        assert torch.equal(voice_rows, voice.codes)
        conv.set_voice(None)  # applies from the next turn: the voice block leaves the context
        _, chunks = await speak(conv, "Now without it.")
        rows = state_of(conv).kv_rows()
        assert not bool((rows[:, 0] == engine.builder.ids.audio_pad_text).any())
    finally:
        engine.close()


async def test_full_kv_pool_evicts_idle_conversations_and_rebuilds_them(parts):
    """KV memory follows real context: when the pool runs low an idle conversation's cache is
    dropped and rebuilt from its rows on its next turn, instead of refusing new work."""
    # ~2 contexts; no shared voice prefix, so each conversation holds its whole context
    # (eviction with shared prefixes: tests/core/test_prefix_cache.py)
    engine = make_engine(parts, kv_num_blocks=36, max_frames_per_turn=20, prefix_cache_voices=0)
    try:
        convs = [engine.conversation(sampling=SamplingParams(seed=i)) for i in range(3)]
        for conv in convs:
            s, chunks = await speak(conv, "Hello there friend.")
            assert s.error is None and chunks
        assert state_of(convs[0]).seq_id is None  # evicted while idle
        s, chunks = await speak(convs[0], "Back again.")
        assert s.error is None and chunks
        assert s.prefilled_rows > 200  # the whole history was prefilled again
        assert [t.text for t in convs[0].turns] == ["Hello there friend.", "Back again."]
    finally:
        engine.close()


async def test_more_streams_than_the_frame_budget_all_finish(parts):
    """With a per-tick frame budget below the number of streams, deadline order must still
    serve every stream to the end (nobody starves)."""
    engine = make_engine(parts, max_batch=2, max_frames_per_turn=20)
    try:
        convs = [engine.conversation(sampling=SamplingParams(seed=i)) for i in range(4)]
        results = await asyncio.gather(*(speak(c, f"Stream {i} here.") for i, c in enumerate(convs)))
        assert all(s.status is TurnStatus.FINISHED and chunks for s, chunks in results)
    finally:
        engine.close()


def test_cli_says_text_into_a_wav(tiny_dirs, tmp_path, capsys):
    """`moss-tts say` must stream a multi-sentence text into a playable 24 kHz WAV."""
    import soundfile

    from core.cli import main

    model_dir, codec_dir = tiny_dirs
    out = tmp_path / "out.wav"
    rc = main(["say", "First sentence. Second one, with a comma! Third?", "-o", str(out),
               "--model", str(model_dir), "--codec", str(codec_dir), "--seed", "1",
               "--max-frames", "30"])
    assert rc == 0
    audio, rate = soundfile.read(str(out))
    assert rate == 24000 and audio.size > 0 and audio.size % 1920 == 0
    assert "first audio" in capsys.readouterr().out
    assert main(["say", "   ", "-o", str(out), "--tiny"]) == 2


def test_public_api_is_importable_from_core():
    """Plugins import only from `core`: every advertised name must resolve (lazily)."""
    import subprocess
    import sys

    import core

    for name in core.__all__:
        assert getattr(core, name) is not None, name
    assert core.TurnStream.__module__ == "core.engine.stream"
    # `import core.errors` stays light: no torch until the engine is used.
    code = "import sys, core.errors; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


async def test_frame_cap_ends_a_turn_that_would_run_on(parts):
    """A turn that would run long must stop at max_frames_per_turn with a final chunk."""
    engine = make_engine(parts, max_frames_per_turn=5)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=12))
        stream, chunks = await speak(conv, "word " * 80)
        assert stream.status is TurnStatus.FINISHED and stream.frames == 5
        assert chunks[-1].final and sum(c.num_samples for c in chunks) == 5 * 1920
        assert conv.turns[-1].frames == 5
        assert "".join(w.word for c in chunks for w in c.words).strip()  # words released
    finally:
        engine.close()


async def test_cancel_while_queued_never_starts_the_turn(parts):
    """Cancelling a queued turn must drop it without audio or context, and not block the
    turn behind it."""
    engine = make_engine(parts)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=13))
        first, queued, third = conv.speak(), conv.speak(), conv.speak()
        queued.cancel()
        with pytest.raises(StreamCancelled):
            await queued.__anext__()
        for s, text in ((first, "One."), (third, "Three.")):
            s.push_text(text)
            s.end_text()
        assert [c async for c in first] and [c async for c in third]
        assert [t.text for t in conv.turns] == ["One.", "Three."]
        assert queued.status is TurnStatus.CANCELLED and queued.frames == 0
    finally:
        engine.close()


async def test_a_stream_left_without_text_times_out_and_frees_its_slot(parts):
    """A forgotten stream (no more text, never ended) must not hold a slot forever."""
    engine = make_engine(parts, max_streams=1, text_timeout_s=0.3)
    try:
        conv = engine.conversation()
        stream = conv.speak()
        stream.push_text("Hello")  # fewer than 12 tokens and no end_text: it waits for more
        with pytest.raises(StreamFailed) as info:
            async for _ in stream:
                pass
        assert isinstance(info.value.__cause__, TimeoutError)
        other = engine.conversation()
        _, chunks = await speak(other, "My turn now.")  # the slot is free again
        assert chunks
    finally:
        engine.close()


async def test_a_failed_turn_keeps_the_audio_it_delivered(parts, monkeypatch):
    """Prevents a failure mid-turn erasing what the listener already heard: the conversation
    keeps the delivered frames as the turn (as a cancel there would), the next turn's prompt
    holds them, and a later cancel(played_s) on the failed stream trims them like any turn."""
    engine = make_engine(parts, max_frames_per_turn=200)
    try:
        ref_conv = engine.conversation(sampling=SamplingParams(seed=5))
        await speak(ref_conv, LONG_TEXT)
        reference = frames_of(ref_conv)
        conv = engine.conversation(sampling=SamplingParams(seed=5))
        runner = engine._loop.runner
        real, calls = runner.decode, [0]

        def faulty(codes, slots, state):
            calls[0] += 1
            if calls[0] > 8:  # the 9th frame fails: 8 decoded, 7 of them delivered (1,1,2,3)
                raise RuntimeError("injected fault")
            return real(codes, slots, state)

        monkeypatch.setattr(runner, "decode", faulty)
        got = []
        with pytest.raises(StreamFailed):
            _, got = await _collect(conv, LONG_TEXT, got)
        monkeypatch.undo()
        delivered = round(sum(c.duration_s for c in got) / 0.08)
        assert delivered == 7
        await wait_until(lambda: bool(conv.turns))
        assert conv.turns[-1].role == "assistant" and conv.turns[-1].frames == delivered
        assert torch.equal(frames_of(conv), reference[:delivered])
        assert LONG_TEXT.startswith(conv.turns[-1].text) and conv.turns[-1].text
        history = state_of(conv).history.rows()  # the failed turn is in the canonical rows ...
        _, chunks = await speak(conv, "Sorry, go on.")
        assert chunks
        kv_rows = state_of(conv).kv_rows()  # ... and in the next turn's prompt
        assert torch.equal(kv_rows[: history.shape[0]], history)
        failed = state_of(conv).finished[0].stream
        assert failed.status is TurnStatus.FAILED
        failed.cancel(played_s=0.16)  # the listener heard only 2 frames of it
        await wait_until(lambda: conv.turns[0].frames == 2)
        assert torch.equal(frames_of(conv, 0), reference[:2])
        assert [t.frames > 0 for t in conv.turns] == [True, True]
    finally:
        engine.close()


async def _collect(conv, text, got):
    stream = conv.speak()
    stream.push_text(text)
    stream.end_text()
    async for chunk in stream:
        got.append(chunk)
    return stream, got


async def test_a_closed_conversation_is_freed_while_the_engine_idles(parts):
    """Prevents the engine thread keeping the last closed conversation (its whole history)
    alive until the next command arrives: its context is collectable at once."""
    import gc
    import weakref

    engine = make_engine(parts)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=1))
        await speak(conv, "Hello there.")
        context = weakref.ref(state_of(conv).history)
        conv_id = conv.conv_id
        conv.close()
        await wait_until(lambda: conv_id not in engine._loop.convs)
        await asyncio.sleep(0.1)  # the engine is idle now, waiting for work
        del conv
        gc.collect()
        assert context() is None
    finally:
        engine.close()


async def test_user_audio_and_voices_are_encoded_off_the_tick_path(parts, monkeypatch):
    """Prevents a long user recording (a minute: seconds of codec time on a CPU) stalling every
    other stream: while one conversation's audio is being encoded, another turn runs to its
    end, and the codec's encode never runs on the engine thread."""
    engine = make_engine(parts)
    held, release = threading.Event(), threading.Event()
    threads: list[str] = []
    encode = engine.codec.encode

    def slow_encode(*args, **kwargs):
        threads.append(threading.current_thread().name)
        held.set()
        assert release.wait(20), "the test never released the encode"
        return encode(*args, **kwargs)

    monkeypatch.setattr(engine.codec, "encode", slow_encode)
    try:
        listener, speaker = engine.conversation(), engine.conversation()
        audio = np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 3).astype(np.float32)
        adding = asyncio.create_task(listener.add_user_turn(text="hi", audio=audio,
                                                            sample_rate=16000))
        await asyncio.to_thread(held.wait, 20)
        stream, chunks = await asyncio.wait_for(speak(speaker, "Still speaking."), 20)
        assert chunks and stream.frames > 0  # a whole turn while the encode was held
        assert not adding.done()
        release.set()
        await asyncio.wait_for(adding, 20)
        assert listener.turns[-1].role == "user" and listener.turns[-1].frames > 0
        voice = await engine.load_voice(audio, sample_rate=16000)
        assert voice.codes.shape[0] > 0
        assert threads and all(name.startswith("moss-encoder") for name in threads), threads
    finally:
        release.set()
        engine.close()
