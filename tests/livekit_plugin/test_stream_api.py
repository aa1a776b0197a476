"""The LiveKit TTS contract of `moss_livekit.TTS`, on the tiny checkpoint (no LiveKit server)."""

from __future__ import annotations

import numpy as np
import pytest
from livekit.agents import APIConnectOptions, tts
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT
from lk_kit import wait_until

from core import SamplingParams
from core.errors import (
    AdmissionError,
    ContextOverflowError,
    EngineClosed,
    InvalidAudioError,
    StreamCancelled,
    StreamFailed,
    TextTooLongError,
)
from moss_livekit import TTS, MossTTSError, engine_occupancy
from moss_livekit.errors import to_api_error

TEXT = "Hello there, how are you today?"
NO_RETRY = APIConnectOptions(max_retry=0, timeout=30.0)


async def _collect(stream: tts.SynthesizeStream) -> list[tts.SynthesizedAudio]:
    return [ev async for ev in stream]


def _deltas(text: str) -> list[str]:
    """Split like an LLM would: small deltas that cut through words."""
    return [text[i : i + 3] for i in range(0, len(text), 3)]


async def test_stream_deltas_in_frames_out_one_segment(engine) -> None:
    """Prevents: LiveKit rejecting the stream (segment mismatch, missing is_final, wrong rate)
    or the transcript synchronizer showing glued or missing words."""
    plugin = TTS(engine=engine)
    metrics: list = []
    plugin.on("metrics_collected", metrics.append)
    stream = plugin.stream(conn_options=NO_RETRY)
    for delta in _deltas(TEXT):
        stream.push_text(delta)
    stream.end_input()
    events = await _collect(stream)
    await stream.aclose()

    assert events, "no audio"
    assert {ev.frame.sample_rate for ev in events} == {24000}
    assert {ev.frame.num_channels for ev in events} == {1}
    assert len({ev.segment_id for ev in events}) == 1
    assert len({ev.request_id for ev in events}) == 1
    assert [ev.is_final for ev in events].count(True) == 1 and events[-1].is_final
    assert all(0 < ev.frame.duration <= 0.25 for ev in events)
    words = [w for ev in events for w in ev.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])]
    assert "".join(words) == TEXT
    starts = [w.start_time for w in words]
    assert starts == sorted(starts)
    total = sum(ev.frame.duration for ev in events)
    assert all(w.end_time <= total + 1e-6 for w in words)
    assert len(metrics) == 1
    assert metrics[0].ttfb > 0 and metrics[0].characters_count == len(TEXT)
    assert metrics[0].audio_duration == pytest.approx(total, abs=1e-3)
    turns = plugin.conversation().turns
    assert [t.role for t in turns] == ["assistant"]
    await plugin.aclose()


async def test_synthesize_collects_a_full_clip(engine) -> None:
    """Prevents: `synthesize()` (FallbackAdapter probes, direct use) returning nothing or a
    partial clip."""
    plugin = TTS(engine=engine)
    frame = await plugin.synthesize("One short sentence.").collect()
    assert frame.sample_rate == 24000 and frame.duration > 0.0
    pcm = np.frombuffer(frame.data, dtype=np.int16)
    assert pcm.size == frame.samples_per_channel
    await plugin.aclose()


async def test_aclose_mid_stream_cancels_the_engine_turn(engine) -> None:
    """Prevents: an interrupted reply keeping the GPU busy (and its slot taken) after LiveKit
    closed the stream."""
    plugin = TTS(engine=engine)
    cancelled_before = engine.stats().turns_cancelled
    stream = plugin.stream(conn_options=NO_RETRY)
    stream.push_text("This reply never ends because the text is never closed")
    first = await stream.__anext__()
    assert first.frame.duration > 0
    await stream.aclose()
    await wait_until(lambda: engine.stats().turns_cancelled > cancelled_before)
    await wait_until(lambda: engine.stats().active_streams == 0)
    # no session tells us what was heard: at most the audio delivered before the close stays
    turns = plugin.conversation().turns
    assert all(t.role == "assistant" for t in turns)
    stream2 = plugin.stream(conn_options=NO_RETRY)
    stream2.push_text("Next.")
    stream2.end_input()
    assert await _collect(stream2), "the conversation must keep working after a cancel"
    await plugin.aclose()


async def test_whitespace_only_stream_opens_no_turn(engine) -> None:
    """Prevents: an empty reply segment (e.g. only markdown removed by LiveKit's filters)
    adding an empty assistant turn to the conversation or failing the session."""
    plugin = TTS(engine=engine)
    stream = plugin.stream(conn_options=NO_RETRY)
    stream.push_text("   ")
    stream.push_text("\n")
    stream.end_input()
    assert await _collect(stream) == []
    assert plugin.conversation() is None
    await plugin.aclose()


async def test_engine_error_becomes_tts_error_event(engine) -> None:
    """Prevents: an engine failure escaping LiveKit's error machinery (no "error" event, no
    fallback) instead of a typed, non-retryable APIError."""
    plugin = TTS(engine=engine)
    errors: list[tts.TTSError] = []
    plugin.on("error", errors.append)
    stream = plugin.stream(conn_options=NO_RETRY)
    stream.push_text("x" * (engine.config.max_text_chars + 1))
    stream.end_input()
    with pytest.raises(MossTTSError) as info:
        await _collect(stream)
    assert isinstance(info.value.moss_error, TextTooLongError)
    assert not info.value.retryable
    assert len(errors) == 1 and not errors[0].recoverable
    await stream.aclose()
    await plugin.aclose()


async def test_works_inside_fallback_adapter(engine) -> None:
    """Prevents: the plugin breaking when users wrap it in tts.FallbackAdapter (capabilities,
    sample rate, stream lifecycle)."""
    plugin = TTS(engine=engine)
    adapter = tts.FallbackAdapter([plugin])
    assert adapter.capabilities.streaming and adapter.capabilities.aligned_transcript
    stream = adapter.stream()
    for delta in _deltas("Fallback works."):
        stream.push_text(delta)
    stream.end_input()
    events = await _collect(stream)
    await stream.aclose()
    assert events and events[-1].is_final
    await adapter.aclose()
    await plugin.aclose()


async def test_occupancy_counts_open_conversations(engine) -> None:
    """Prevents: a worker reporting itself idle while its engine's conversation slots fill."""
    before = engine_occupancy(engine)
    convs = [engine.conversation() for _ in range(4)]
    during = engine_occupancy(engine)
    assert during == pytest.approx(before + 4 / engine.config.max_conversations)
    for conv in convs:
        await conv.aclose()
    await wait_until(lambda: engine_occupancy(engine) == before)


def test_bad_options_raise_precise_errors(engine) -> None:
    """Prevents: misconfiguration surfacing later as an obscure failure inside a call."""
    with pytest.raises(TypeError):
        TTS(engine=engine, voice=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TTS(engine=engine, sampling={"temperature": 0.1})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TTS(engine=engine, frame_size_ms=0)
    with pytest.raises(TypeError):
        TTS(engine="not an engine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="voice file not found"):
        TTS(engine=engine, voice="/no/such/voice.wav")
    with pytest.raises(ValueError, match="voice file not found"):
        TTS(engine=engine).update_options(voice="/no/such/voice.wav")


def _reference_wave(seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(24000 * seconds), dtype=np.float32) / 24000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(
        np.float32
    )


async def _speak_once(plugin: TTS, text: str) -> None:
    stream = plugin.stream(conn_options=NO_RETRY)
    stream.push_text(text)
    stream.end_input()
    assert await _collect(stream)
    await stream.aclose()


async def test_voice_and_sampling_updates_apply_from_the_next_turn(engine) -> None:
    """Prevents: `update_options` being ignored, or changing the voice of a turn mid-sentence."""
    plugin = TTS(engine=engine)
    await _speak_once(plugin, "First turn, default voice.")
    conv = plugin.conversation()
    assert conv.voice is None
    plugin.update_options(voice=_reference_wave(), sampling=SamplingParams(temperature=0.0))
    await _speak_once(plugin, "Second turn, cloned voice.")
    assert plugin.conversation() is conv
    assert conv.voice is not None and conv.voice.duration_s > 1.0
    assert conv.sampling.temperature == 0.0 and conv.sampling.seed is not None
    assert [t.role for t in conv.turns] == ["assistant", "assistant"]
    seed = conv.sampling.seed
    plugin.update_options(sampling=None)  # back to the engine defaults, same random stream
    await _speak_once(plugin, "Third turn, default sampling.")
    assert conv.sampling == SamplingParams(seed=seed)
    await plugin.aclose()


async def test_bad_reference_audio_is_a_non_retryable_error(engine) -> None:
    """Prevents: an unreadable voice file being retried forever or crashing the worker instead
    of one clear, non-retryable error naming the audio problem."""
    plugin = TTS(engine=engine, voice=b"this is not audio")
    errors: list[tts.TTSError] = []
    plugin.on("error", errors.append)
    stream = plugin.stream(conn_options=APIConnectOptions(max_retry=2, timeout=30.0))
    stream.push_text("Hello.")
    stream.end_input()
    with pytest.raises(MossTTSError) as info:
        await _collect(stream)
    assert isinstance(info.value.moss_error, InvalidAudioError)
    assert info.value.status_code == 400 and not info.value.retryable
    assert len(errors) == 1  # no retries for bad input
    await stream.aclose()
    await plugin.aclose()


@pytest.mark.parametrize(
    ("error", "status", "retryable"),
    [
        (AdmissionError("full"), 503, True),
        (StreamFailed("boom"), 500, True),
        (TimeoutError("stalled"), 504, True),
        (TextTooLongError("long"), 413, False),
        (ContextOverflowError("ctx"), 413, False),
        (InvalidAudioError("bad"), 400, False),
        (EngineClosed("closed"), 503, False),
        (StreamCancelled("gone"), 499, True),
        (RuntimeError("bug"), 500, False),
    ],
)
def test_core_errors_map_to_livekit_errors(error, status, retryable) -> None:
    """Prevents: LiveKit retrying input errors forever, or never retrying a full engine."""
    mapped = to_api_error(error, request_id="r1")
    assert isinstance(mapped, MossTTSError) and mapped.moss_error is error
    assert (mapped.status_code, mapped.retryable) == (status, retryable)
    assert mapped.__cause__ is error and mapped.request_id == "r1"


async def test_full_engine_is_retried_and_then_speaks(engine) -> None:
    """Prevents: a momentarily full engine (every slot speaking) failing the reply for good
    instead of LiveKit retrying once a slot is free."""
    blockers = []
    for _ in range(engine.config.max_streams):
        conv = engine.conversation()
        turn = conv.speak()
        turn.push_text("Holding a slot")
        blockers.append((conv, turn))
    plugin = TTS(engine=engine)
    errors: list[tts.TTSError] = []

    def free_slots(ev: tts.TTSError) -> None:
        errors.append(ev)
        for _, turn in blockers:
            turn.cancel()

    plugin.on("error", free_slots)
    stream = plugin.stream(conn_options=APIConnectOptions(max_retry=1, timeout=30.0))
    stream.push_text("Finally my turn.")
    stream.end_input()
    events = await _collect(stream)
    await stream.aclose()
    assert events and events[-1].is_final
    assert len(errors) == 1 and errors[0].recoverable
    assert isinstance(errors[0].error.moss_error, AdmissionError)
    for conv, _ in blockers:
        await conv.aclose()
    await plugin.aclose()
