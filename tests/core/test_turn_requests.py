"""The turn request as the wire will carry it: user turns, voice and sampling travel with
`speak()`, the engine orders a conversation's requests itself, and stopping a turn and saying
what was heard are two separate calls."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from engine_kit import KINDS, build_engine, load_parts, open_engine, state_of
from engine_kit import say_all as _say
from engine_kit import until as _until

from core import SamplingParams, TurnStatus, UserTurn
from core.errors import StreamCancelled

FRAME_S = 0.08


@pytest.fixture(scope="module")
def parts(tiny_dirs):
    return load_parts(tiny_dirs)


@pytest.mark.parametrize("kind", KINDS)
async def test_requests_made_back_to_back_run_in_order_without_waiting(parts, kind):
    """Prevents a caller having to serialise its own requests: a reply whose user speech is
    still being encoded and the next reply, asked for at once, land in the order asked."""
    async with open_engine(kind, parts) as engine:
        conv = engine.conversation(sampling=SamplingParams(seed=2))
        speech = (0.1 * np.random.default_rng(1).standard_normal(16000 * 3)).astype(np.float32)
        first = conv.speak(user=UserTurn("Tell me a story.", speech, 16000))
        second = conv.speak(user=[UserTurn("Shorter, please."), UserTurn("And quick.")])
        assert second.status is TurnStatus.QUEUED
        out = await asyncio.gather(_say(first, "Once upon a time."), _say(second, "Fine."))
        assert all(out)
        turns = conv.turns
        assert [(t.role, t.text) for t in turns] == [
            ("user", "Tell me a story."), ("assistant", "Once upon a time."),
            ("user", "Shorter, please."), ("user", "And quick."), ("assistant", "Fine.")]
        assert turns[0].frames == 37  # 3 s of speech (37 whole frames), encoded before the reply


async def test_voice_and_sampling_travel_with_the_turn_and_the_seed_continues(parts):
    """Prevents plugins re-implementing "keep the conversation's seed when the new sampling has
    none": the request's sampling applies from its turn, and its seed None continues the
    conversation's random stream (the same codes as never having changed it)."""
    rng = np.random.default_rng(0)
    ref = (0.1 * rng.standard_normal(24000 * 2)).astype(np.float32)
    engine = build_engine(parts)
    try:
        voice = await engine.load_voice(ref, sample_rate=24000)
        plain = engine.conversation(sampling=SamplingParams(seed=9))
        await _say(plain.speak(), "First turn.")
        await _say(plain.speak(voice=voice), "Second turn.")
        changed = engine.conversation(sampling=SamplingParams(seed=9))
        await _say(changed.speak(), "First turn.")
        assert changed.voice is None
        stream = changed.speak(voice=voice, sampling=SamplingParams())  # seed None: continue
        await _say(stream, "Second turn.")
        assert changed.sampling == SamplingParams(seed=9) and changed.voice is voice
        assert torch.equal(state_of(changed).history.turns[-1].codes,
                           state_of(plain).history.turns[-1].codes)
        rows = state_of(changed).kv_rows()
        voice_rows = rows[rows[:, 0] == engine.builder.ids.audio_pad_text][:, 1:]
        assert torch.equal(voice_rows, voice.codes)
    finally:
        engine.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_stop_and_mark_played_are_separate_calls(parts, kind):
    """Prevents a plugin cancelling twice to stop the GPU and then record what was heard: stop()
    ends generation and keeps what was delivered; a later mark_played cuts it to the heard part,
    and a mark_played that arrives while the turn runs applies when it ends."""
    async with open_engine(kind, parts, max_frames_per_turn=200) as engine:
        conv = engine.conversation(sampling=SamplingParams(seed=4))
        stream = conv.speak()
        stream.push_text("one two three four five six seven eight nine ten " * 3)
        got = []
        async for chunk in stream:
            got.append(chunk)
            if sum(c.duration_s for c in got) >= 6 * FRAME_S:
                break
        stream.stop()
        with pytest.raises(StreamCancelled):
            await stream.__anext__()
        await _until(lambda: bool(conv.turns))
        kept = conv.turns[-1].frames
        assert kept >= 6 and stream.status is TurnStatus.CANCELLED
        stream.mark_played(2 * FRAME_S)
        await _until(lambda: conv.turns[-1].frames == 2)

        early = conv.speak()
        early.push_text("Another answer that is long enough to be cut early on.")
        await _until(lambda: early.frames >= 4)
        early.mark_played(3 * FRAME_S)  # heard so far; the turn goes on
        early.end_text()
        chunks = [c async for c in early]
        assert chunks and early.status is TurnStatus.FINISHED
        await _until(lambda: len(conv.turns) == 2)
        assert conv.turns[-1].frames == 3
        with pytest.raises(ValueError, match="played_s"):
            early.mark_played(None)


@pytest.mark.parametrize("kind", KINDS)
async def test_unusable_user_speech_fails_its_turn_clearly_and_the_next_speaks(parts, kind):
    """Prevents user audio that passes the header check but cannot be decoded from hanging the
    conversation: its turn ends with InvalidAudioError before any audio, no user turn is
    added, and the next request speaks."""
    from core.errors import InvalidAudioError

    async with open_engine(kind, parts) as engine:
        conv = engine.conversation(sampling=SamplingParams(seed=3))
        broken = np.full(16000, np.nan, dtype=np.float32)
        bad = conv.speak(user=UserTurn("Hello?", broken, 16000))
        bad.end_text()
        with pytest.raises(InvalidAudioError):
            async for _ in bad:
                pass
        good = conv.speak(user=UserTurn("Hello again."))
        assert await _say(good, "Hi.")
        assert [t.role for t in conv.turns] == ["user", "assistant"]


def test_the_history_budget_never_exceeds_the_model_positions(parts):
    """`max_position_embeddings` is enforced: a context budget above it is cut to it."""
    model = parts[0]
    limit = model.config.backbone.max_position_embeddings
    engine = build_engine(parts, max_context_rows=limit * 4, kv_num_blocks=limit // 16 * 8)
    try:
        conv = engine.conversation()
        assert state_of(conv).history.max_rows == limit
    finally:
        engine.close()
