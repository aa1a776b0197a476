"""MossTTSService inside Pipecat's own `run_test` harness: frame orders, rates, settings, odd text."""

from __future__ import annotations

import numpy as np
import pytest
from moss_pc_support import audio_frames, llm_turn, pcm_seconds, tokens_of
from pipecat.frames.frames import (
    AggregatedTextFrame,
    AggregatedTextProgressFrame,
    ErrorFrame,
    LLMAssistantPushAggregationFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TTSUsageMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.services.tts_service import TextAggregationMode
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.utils.text.transforms import strip_markdown

from moss_pipecat import MossTTSService

TEXT = "Hello there. How are you today?"
METRICS = PipelineParams(enable_metrics=True, enable_usage_metrics=True)


def _types(frames) -> list[type]:
    return [type(f) for f in frames if not isinstance(f, MetricsFrame)]


def _assert_one_utterance(frames, context_text: str | None = None) -> None:
    """The canonical per-utterance order: Started, then only audio / words, then Stopped."""
    kinds = _types(frames)
    assert kinds.count(TTSStartedFrame) == 1 and kinds.count(TTSStoppedFrame) == 1, kinds
    start, stop = kinds.index(TTSStartedFrame), kinds.index(TTSStoppedFrame)
    inside = set(kinds[start + 1 : stop])
    assert TTSAudioRawFrame in inside
    allowed = {
        TTSAudioRawFrame,
        TTSTextFrame,
        AggregatedTextFrame,
        AggregatedTextProgressFrame,
        LLMAssistantPushAggregationFrame,
    }
    assert inside <= allowed, inside
    audio = audio_frames(frames)
    ctx = {f.context_id for f in audio}
    assert len(ctx) == 1 and None not in ctx, "all audio of one turn shares one context id"
    started = next(f for f in frames if isinstance(f, TTSStartedFrame))
    stopped = next(f for f in frames if isinstance(f, TTSStoppedFrame))
    assert started.context_id == stopped.context_id == ctx.pop()
    if context_text is not None:
        words = [f.text for f in frames if isinstance(f, TTSTextFrame)]
        assert " ".join(words) == context_text


async def test_token_mode_frame_order(engine) -> None:
    """A token-streamed LLM reply must come out as Start, audio+words, Stop, then the reply end;
    otherwise transports and the assistant context see a broken or reordered turn."""
    tts = MossTTSService(engine=engine)
    down, up = await run_test(
        tts, frames_to_send=llm_turn(*tokens_of(TEXT)), pipeline_params=METRICS
    )
    kinds = _types(down)
    assert kinds[0] is LLMFullResponseStartFrame and kinds[-1] is LLMFullResponseEndFrame
    _assert_one_utterance(down, context_text=TEXT)
    assert kinds.index(TTSStoppedFrame) < kinds.index(LLMFullResponseEndFrame)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    metrics = [d for f in down if isinstance(f, MetricsFrame) for d in f.data]
    ttfb = [m for m in metrics if isinstance(m, TTFBMetricsData) and m.value > 0]
    usage = [m for m in metrics if isinstance(m, TTSUsageMetricsData)]
    assert len(ttfb) == 1, "one TTFB per turn"
    assert [u.value for u in usage] == [len(TEXT)]


async def test_llm_pause_does_not_end_the_turn(engine) -> None:
    """A tool call pauses the LLM mid-reply for longer than Pipecat's context timeout; the reply
    must stay one turn (one Start/Stop, one context) instead of being cut in two."""
    tts = MossTTSService(engine=engine, stop_frame_timeout_s=0.3)
    frames = llm_turn("Let me check", " that for you.", " It is", " ready.")
    frames.insert(3, SleepFrame(1.0))  # the LLM is busy with a tool call
    down, up = await run_test(tts, frames_to_send=frames)
    _assert_one_utterance(down, context_text="Let me check that for you. It is ready.")
    assert not [f for f in up if isinstance(f, ErrorFrame)]


async def test_sentence_mode_frame_order(engine) -> None:
    """Sentence aggregation stays available: one turn, one context, sentences joined with a space
    (else the model would read "there.How" as one word)."""
    tts = MossTTSService(engine=engine, text_aggregation_mode=TextAggregationMode.SENTENCE)
    down, _ = await run_test(tts, frames_to_send=llm_turn("Hello there", ". How are", " you?"))
    _assert_one_utterance(down)
    anchors = [f.text for f in down if type(f) is AggregatedTextFrame]
    assert anchors == ["Hello there.", "How are you?"]
    assert tts._latest is not None and tts._latest.text == "Hello there. How are you?"


async def test_sentence_mode_joins_cjk_sentences_without_a_space(engine) -> None:
    """Prevents a space the model would read between Chinese or Japanese sentences (those
    scripts put none there)."""
    tts = MossTTSService(engine=engine, text_aggregation_mode=TextAggregationMode.SENTENCE)
    await run_test(tts, frames_to_send=llm_turn("你好，世界。", "今天很好。"))
    assert tts._latest is not None and tts._latest.text == "你好，世界。今天很好。"


async def test_tts_speak_frame_and_non_interruptible(engine) -> None:
    """`TTSSpeakFrame` (also non-interruptible ones) must be spoken as its own utterance and
    committed to the assistant context afterwards."""
    tts = MossTTSService(engine=engine)
    speak = TTSSpeakFrame("Please hold on.")
    speak.interruptible = False
    down, _ = await run_test(tts, frames_to_send=[speak])
    _assert_one_utterance(down, context_text="Please hold on.")
    kinds = _types(down)
    last_audio = max(i for i, k in enumerate(kinds) if k is TTSAudioRawFrame)
    assert kinds.index(LLMAssistantPushAggregationFrame) > last_audio, "commit after the audio"
    assert all(not f.interruptible for f in audio_frames(down))


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_output_is_resampled_to_pipeline_rate(engine, rate) -> None:
    """Telephony (8 kHz) and 16 kHz pipelines must get audio at their rate with the same
    duration, or the caller hears chipmunk speech."""
    native = MossTTSService(engine=engine, settings=MossTTSService.Settings(seed=3))
    down24, _ = await run_test(native, frames_to_send=llm_turn("Short", " reply."))
    tts = MossTTSService(engine=engine, sample_rate=rate, settings=MossTTSService.Settings(seed=3))
    down, _ = await run_test(tts, frames_to_send=llm_turn("Short", " reply."))
    audio = audio_frames(down)
    assert audio and all(f.sample_rate == rate for f in audio)
    assert pcm_seconds(audio) == pytest.approx(pcm_seconds(audio_frames(down24)), abs=0.03)
    pcm = np.frombuffer(b"".join(f.audio for f in audio), dtype=np.int16)
    assert np.abs(pcm).max() > 0


async def test_settings_update_applies_from_next_turn(engine, tmp_path, monkeypatch) -> None:
    """`TTSUpdateSettingsFrame` must change voice and sampling for the next turn only, and a bad
    value must be refused with an error instead of breaking the call."""
    voice = tmp_path / "voice.wav"
    _write_voice(voice)
    calls: list[str] = []
    conv_cls = type(engine.conversation())
    speak = conv_cls.speak
    monkeypatch.setattr(  # each reply's request carries its voice
        conv_cls, "speak",
        lambda self, **kw: calls.append(f"voice:{kw.get('voice') is not None}") or speak(self, **kw))
    tts = MossTTSService(engine=engine)
    delta = MossTTSService.Settings(voice=str(voice), temperature=0.3, top_k=5, seed=7)
    bad = MossTTSService.Settings(top_p=1.5)
    down, up = await run_test(
        tts,
        frames_to_send=[
            *llm_turn("First", " turn."),
            TTSUpdateSettingsFrame(delta=delta),
            TTSUpdateSettingsFrame(delta=bad),
            *llm_turn("Second", " turn."),
        ],
    )
    assert sum(isinstance(f, TTSStoppedFrame) for f in down) == 2
    assert tts._settings.voice == str(voice) and tts._settings.temperature == 0.3
    assert tts._settings.top_p != 1.5, "invalid value rolled back"
    assert any("top_p" in f.error for f in up if isinstance(f, ErrorFrame))
    assert calls == ["voice:False", "voice:True"], "voice changes between the turns"
    assert tts.conversation.voice is not None
    assert tts.conversation.sampling.temperature == 0.3 and tts.conversation.sampling.seed == 7


async def test_an_unusable_new_voice_keeps_the_current_one(engine, tmp_path) -> None:
    """Prevents: a voice update to a file that exists but cannot be used (silent) leaving the
    call without any voice prompt; the error names the file and the old voice stays."""
    import soundfile as sf

    good, silent = tmp_path / "voice.wav", tmp_path / "silent.wav"
    _write_voice(good)
    sf.write(silent, np.zeros(24000 * 3, dtype=np.float32), 24000)
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(voice=str(good)))
    down, up = await run_test(
        tts,
        frames_to_send=[
            *llm_turn("First", " turn."),
            TTSUpdateSettingsFrame(delta=MossTTSService.Settings(voice=str(silent))),
            *llm_turn("Second", " turn."),
        ],
    )
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "silent.wav" in errors[0], errors
    assert sum(isinstance(f, TTSStoppedFrame) for f in down) == 2
    assert tts.conversation.voice is not None and tts._settings.voice == str(good)


@pytest.mark.parametrize("tokens", [[], [" "], ["  ", "\n", "\t"]])
async def test_empty_and_whitespace_turns_make_no_audio(engine, tokens) -> None:
    """An LLM reply with nothing to say must pass through without audio, errors or a hang."""
    tts = MossTTSService(engine=engine)
    down, up = await run_test(tts, frames_to_send=[*llm_turn(*tokens), *llm_turn("Ok.")])
    assert sum(isinstance(f, TTSStartedFrame) for f in down) == 1
    assert not [f for f in up if isinstance(f, ErrorFrame)]


async def test_emoji_only_turn_completes(engine) -> None:
    """Emoji-only text must end the turn cleanly (with or without audio) and the next turn
    must still be spoken."""
    tts = MossTTSService(engine=engine)
    down, _ = await run_test(
        tts, frames_to_send=[*llm_turn("😀", "🎉"), SleepFrame(0.1), *llm_turn("Fine.")]
    )
    kinds = _types(down)
    assert kinds.count(TTSStartedFrame) == kinds.count(TTSStoppedFrame) == 2
    assert audio_frames(down)[-1].context_id == [
        f for f in down if isinstance(f, TTSStoppedFrame)
    ][-1].context_id


async def test_engine_error_becomes_error_frame(engine) -> None:
    """An engine failure (here: text over the per-turn limit) must surface as an ErrorFrame, not
    a silent hang or a crashed pipeline."""
    tts = MossTTSService(engine=engine)
    limit = engine.config.max_text_chars
    down, up = await run_test(tts, frames_to_send=[*llm_turn("x" * (limit + 10)), *llm_turn("Ok.")])
    assert [f for f in up if isinstance(f, ErrorFrame)]
    assert any(isinstance(f, TTSAudioRawFrame) for f in down), "the next turn still speaks"


async def test_markdown_is_not_spoken_with_text_transforms(engine) -> None:
    """The documented recipe must keep markdown out of the model's input in token mode."""
    tts = MossTTSService(engine=engine, text_transforms=[("*", strip_markdown)])
    await run_test(tts, frames_to_send=llm_turn("Here", " is", " **bold**", " text", "."))
    spoken = tts.conversation.turns[0].text
    assert "*" not in spoken and "bold" in spoken


def test_constructor_rejects_bad_arguments(engine) -> None:
    """Misconfiguration fails at construction with a precise message."""
    with pytest.raises(ValueError, match="exactly one"):
        MossTTSService()
    with pytest.raises(ValueError, match="codec"):
        MossTTSService(model="some/model")
    with pytest.raises(ValueError, match="temperature"):
        MossTTSService(engine=engine, settings=MossTTSService.Settings(temperature=-1.0))


def _write_voice(path) -> None:
    import soundfile as sf

    t = np.arange(24000 * 3) / 24000
    wave = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, wave.astype(np.float32), 24000)
