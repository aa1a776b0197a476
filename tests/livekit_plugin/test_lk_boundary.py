"""Bad input and cancellation at the LiveKit plugin boundary: a precise `APIError` or a clean end,
and the shared engine keeps serving with no stream or conversation left behind."""

from __future__ import annotations

import numpy as np
import pytest
from livekit.agents import APIConnectOptions, tts
from lk_kit import NumberedFrames, make_session, new_agent, wait_until

from core.errors import InvalidAudioError
from moss_livekit import TTS, MossTTSError
from moss_livekit.user_audio import UserAudioTap

NO_RETRY = APIConnectOptions(max_retry=0, timeout=30.0)


async def _speak(plugin: TTS, *deltas: str) -> list[tts.SynthesizedAudio]:
    stream = plugin.stream(conn_options=NO_RETRY)
    for delta in deltas:
        stream.push_text(delta)
    stream.end_input()
    try:
        return [ev async for ev in stream]
    finally:
        await stream.aclose()


async def _idle(engine) -> None:
    await wait_until(lambda: engine.stats().active_streams == 0 and engine.stats().queued_turns == 0)


@pytest.mark.parametrize(
    "text",
    [
        "\ud83d half a surrogate pair.",
        "Null\x00 and bell\x07 characters.",
        "\u202eright-to-left override\u202c and zero\u200bwidth.",
        "e\u0301\u0301\u0301 combining marks, 👩‍👩‍👧 and ﷽.",
    ],
)
async def test_odd_unicode_never_breaks_the_room(engine, text) -> None:
    """Odd Unicode from an LLM must not fail the stream with a non-LiveKit exception (which
    bypasses LiveKit's error handling) nor stop the next reply."""
    plugin = TTS(engine=engine)
    try:
        await _speak(plugin, *[text[i : i + 4] for i in range(0, len(text), 4)])
        assert await _speak(plugin, "Fine."), "the next reply speaks"
        assert plugin.conversation().turns[-1].text == "Fine."
    finally:
        await plugin.aclose()
    await _idle(engine)


async def test_silent_reference_audio_is_a_precise_error(engine) -> None:
    """A silent voice recording must fail with a non-retryable 400 naming the audio problem,
    and a corrected voice must work on the same TTS."""
    plugin = TTS(engine=engine, voice=np.zeros(24000 * 3, dtype=np.float32))
    try:
        with pytest.raises(MossTTSError) as info:
            await _speak(plugin, "Hello.")
        assert isinstance(info.value.moss_error, InvalidAudioError)
        assert info.value.status_code == 400 and not info.value.retryable
        plugin.update_options(voice=None)
        assert await _speak(plugin, "Hello again.")
    finally:
        await plugin.aclose()
    await _idle(engine)


async def test_aclose_before_first_audio_leaves_nothing(engine) -> None:
    """A reply cancelled before any audio was produced (barge-in at once) must free its engine
    slot and leave no assistant turn behind."""
    plugin = TTS(engine=engine)
    try:
        stream = plugin.stream(conn_options=NO_RETRY)
        stream.push_text("This is never heard")
        await wait_until(lambda: plugin.conversation() is not None)
        await stream.aclose()
        await _idle(engine)
        conv = plugin.conversation()
        await wait_until(lambda: conv.turns == ())
    finally:
        await plugin.aclose()


async def test_ended_session_gives_back_its_conversation(engine) -> None:
    """A room that ended must return its conversation slot to the shared engine, or a worker
    stops accepting rooms after max_conversations calls."""
    before = engine.stats().conversations
    plugin = TTS(engine=engine)
    session, _, audio, _ = make_session(plugin, ["Goodbye."], speed=4.0)
    await session.start(new_agent())
    try:
        await session.run(user_input="Bye")
        assert engine.stats().conversations == before + 1
    finally:
        await session.aclose()
        await audio.aclose()
    await wait_until(lambda: engine.stats().conversations == before)
    await plugin.aclose()
    await _idle(engine)


async def test_reply_growing_past_the_limit_fails_precisely_and_the_next_speaks(engine) -> None:
    """A streamed reply that grows past the engine's text limit must end with a non-retryable
    413 (LiveKit's error event), stop its engine turn, and leave the TTS usable."""
    plugin = TTS(engine=engine)
    chunk = "word " * 20
    deltas = [chunk] * (engine.config.max_text_chars // len(chunk) + 2)
    try:
        with pytest.raises(MossTTSError) as info:
            await _speak(plugin, *deltas)
        assert info.value.status_code == 413 and not info.value.retryable
        assert "max_text_chars" in str(info.value)
        await _idle(engine)
        assert await _speak(plugin, "Shorter now.")
        assert plugin.conversation().turns[-1].text == "Shorter now."
    finally:
        await plugin.aclose()


async def test_user_audio_tap_keeps_the_speech_before_the_vad_fired() -> None:
    """Prevents: the user's first syllables missing from the audio the model is conditioned on
    (the VAD says "speaking" only after some speech): the 0.3 s before it are kept."""
    tap = UserAudioTap(NumberedFrames())
    for _ in range(50):  # 0.5 s of audio before the VAD fires
        await tap.__anext__()
    tap.recording = True
    for _ in range(20):
        await tap.__anext__()
    tap.recording = False
    for _ in range(10):  # after the turn: not recorded
        await tap.__anext__()
    pcm, rate = tap.take()
    frames = pcm.reshape(-1, 240)[:, 0].tolist()
    assert rate == 24000 and frames == list(range(21, 71))  # 0.3 s pre-roll + 20 frames
    assert tap.take() is None
