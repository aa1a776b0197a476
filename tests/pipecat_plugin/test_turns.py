"""turns.py on its own: the played-position clock, the fade, the user-turn queue and capture."""

from __future__ import annotations

import numpy as np
import pytest
from pipecat.frames.frames import (
    InputAudioRawFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.tests.utils import run_test

from moss_pipecat.turns import MossUserTurnCapture, PlayoutClock, UserTurnQueue, fade_out

SR = 24000


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _pcm(seconds: float, value: int = 1000) -> bytes:
    return np.full(int(seconds * SR), value, dtype=np.int16).tobytes()


def test_played_follows_speaking_time_and_never_passes_pushed_audio() -> None:
    """A cut too late keeps unheard words in the context; too early drops heard ones."""
    t = FakeTime()
    clock = PlayoutClock(t)
    clock.pushed("a", _pcm(1.0), SR)
    t.now += 0.5
    assert clock.played_s("a") == 0.0, "nothing plays before the transport starts"
    clock.bot_started()
    t.now += 0.4
    assert clock.played_s("a") == pytest.approx(0.4)
    t.now += 2.0
    assert clock.played_s("a") == pytest.approx(1.0), "capped at the audio pushed"
    clock.bot_stopped()
    assert clock.played_s("a") == pytest.approx(1.0)


def test_stall_inside_a_reply_is_measured_whether_or_not_the_bot_stopped_speaking() -> None:
    """Words after an LLM pause play later by the time the speaker sat dry: that time is counted
    per reply (with the transport still 'speaking', or after it said it stopped), and the gap
    before a new reply is not a stall of it."""
    t = FakeTime()
    clock = PlayoutClock(t)
    clock.pushed("a", _pcm(0.5), SR)
    clock.bot_started()
    t.now += 0.8  # dry for 0.3 s, transport still speaking
    clock.pushed("a", _pcm(0.5), SR)
    assert clock.stalled_s("a") == pytest.approx(0.3)
    t.now += 0.7  # the second piece ends at +0.5; the bot stops 0.2 s later
    clock.bot_stopped()
    t.now += 1.0
    clock.pushed("a", _pcm(0.5), SR)
    assert clock.stalled_s("a") == pytest.approx(0.3 + 1.2)
    clock.bot_started()
    t.now += 2.0
    clock.pushed("b", _pcm(0.5), SR)  # a new reply after a gap
    assert clock.stalled_s("b") == 0.0 and clock.stalled_s("unknown") == 0.0


def test_contexts_play_one_after_another() -> None:
    """The second reply's position starts only after the first reply's audio."""
    t = FakeTime()
    clock = PlayoutClock(t)
    clock.pushed("a", _pcm(0.5), SR)
    clock.pushed("b", _pcm(1.0), SR)
    clock.bot_started()
    t.now += 0.8
    assert clock.played_s("a") == pytest.approx(0.5)
    assert clock.played_s("b") == pytest.approx(0.3)
    assert clock.pushed_s("b") == pytest.approx(1.0)
    assert clock.played_s("unknown") == 0.0


def test_underrun_restarts_the_cursor_when_audio_resumes() -> None:
    """When generation falls behind real time the speaker waits; that wait is not playback."""
    t = FakeTime()
    clock = PlayoutClock(t)
    clock.pushed("a", _pcm(0.2), SR)
    clock.bot_started()
    t.now += 0.5  # 0.3 s of silence: the transport ran dry
    clock.pushed("a", _pcm(0.2), SR)
    t.now += 0.1
    assert clock.played_s("a") == pytest.approx(0.3)


def test_tail_continues_after_the_chunk_being_written() -> None:
    """The fade must start where the transport's current chunk ends, or it clicks itself."""
    t = FakeTime()
    clock = PlayoutClock(t)
    ramp = np.arange(SR, dtype=np.int16)  # sample value == sample index
    clock.pushed("a", ramp.tobytes(), SR)
    assert clock.tail(0.008, 0.04) is None, "not playing yet"
    clock.bot_started()
    t.now += 0.05  # inside the second 40 ms chunk
    ctx, samples, rate = clock.tail(0.008, 0.04)
    assert ctx == "a" and rate == SR
    assert samples[0] == int(0.08 * SR) and len(samples) == int(0.008 * SR)
    t.now += 5.0
    assert clock.tail(0.008, 0.04) is None, "nothing left to fade once all audio played"


def test_fade_out_ramps_to_silence_and_pads_to_a_whole_chunk() -> None:
    """A partial chunk would wait in the transport and play in front of the next reply."""
    samples = np.full(192, 10000, dtype=np.int16)
    out = np.frombuffer(fade_out(samples, pad_to=960), dtype=np.int16)
    assert len(out) == 960 and out[0] > 9000 and out[191] == 0 and not out[192:].any()
    assert np.all(np.diff(out[:192].astype(int)) <= 0), "monotonic fade"


def test_user_turn_goes_before_the_reply_that_answers_it() -> None:
    """Words said before a reply started precede it, even if the user speaks again before that
    reply's engine turn opens; otherwise the model would answer the wrong turn."""
    q = UserTurnQueue()
    q.add_text("What time is it?")
    q.reply_started("a")
    q.add_text("And the date?")  # already the next user turn
    q.reply_started("b")
    first = q.take(q.reply_seq("a"))
    assert first is not None and first.text == "What time is it?" and first.audio is None
    assert q.take(q.reply_seq("b")).text == "And the date?"
    assert q.take(q.reply_seq("c")) is None


def test_user_turns_of_an_unspoken_reply_merge_into_the_next() -> None:
    """A reply with nothing to say never opens an engine turn; its user turn must not be lost."""
    q = UserTurnQueue()
    q.add_text("Hello?")
    q.add_audio(np.ones(1600, dtype=np.float32), 16000)
    q.reply_started("empty")
    q.add_text("Are you there?")
    q.add_audio(np.ones(800, dtype=np.float32), 16000)
    q.reply_started("spoken")
    user = q.take(q.reply_seq("spoken"))
    assert user.text == "Hello? Are you there?"
    assert user.sample_rate == 16000 and len(user.audio) == 2400
    with pytest.raises(ValueError, match="sample_rate"):
        q.add_audio(np.ones(10, dtype=np.float32), 0)


def test_a_refused_replys_user_turn_goes_before_the_next_reply() -> None:
    """Prevents what the user said being lost when the engine refused the reply it came with
    (engine full): it is given back and sent, in order, with the next reply."""
    q = UserTurnQueue()
    q.add_text("First question.")
    q.add_audio(np.ones(1600, dtype=np.float32), 16000)
    q.reply_started("refused")
    refused = q.take(q.reply_seq("refused"))
    q.put_back(1, refused)
    q.add_text("Second question.")
    q.reply_started("next")
    user = q.take(q.reply_seq("next"))
    assert user.text == "First question. Second question."
    assert user.sample_rate == 16000 and len(user.audio) == 1600


class _StagingStub:
    def __init__(self) -> None:
        self.texts: list[str] = []
        self.audio: list[tuple[np.ndarray, int]] = []

    def stage_user_text(self, text: str) -> None:
        self.texts.append(text)

    def stage_user_audio(self, audio: np.ndarray, rate: int) -> None:
        self.audio.append((audio, rate))


def _chunks(seconds: float, value: int, rate: int = 16000) -> list[InputAudioRawFrame]:
    pcm = np.full(int(0.02 * rate), value, dtype=np.int16).tobytes()
    return [InputAudioRawFrame(pcm, rate, 1) for _ in range(round(seconds / 0.02))]


async def test_capture_records_speech_with_preroll_and_forwards_everything() -> None:
    """The user's speech is kept from just before VAD fired (VAD is late) to its end, capped,
    and every frame still reaches the rest of the pipeline."""
    stub = _StagingStub()
    capture = MossUserTurnCapture(stub, capture_audio=True, pre_roll_s=0.1, max_audio_s=0.5)
    frames = [
        *_chunks(0.3, 1),  # before speech: only the last 0.1 s is kept
        UserStartedSpeakingFrame(),
        *_chunks(0.6, 2),  # speech, longer than max_audio_s
        UserStoppedSpeakingFrame(),
        *_chunks(0.2, 3),  # after speech: not recorded
        TranscriptionFrame("hi there", "user", ""),
        TranscriptionFrame("   ", "user", ""),
    ]
    down, _ = await run_test(capture, frames_to_send=frames)
    assert len(down) == len(frames)
    assert stub.texts == ["hi there"]
    (audio, rate), = stub.audio
    assert rate == 16000 and len(audio) == int(0.5 * 16000)
    assert np.allclose(audio[: int(0.1 * 16000)], 1 / 32768)  # the pre-roll comes first
    assert np.allclose(audio[int(0.1 * 16000) :], 2 / 32768)


async def test_capture_without_audio_keeps_only_words() -> None:
    """With capture_audio=False (the default) the user's audio is not kept."""
    stub = _StagingStub()
    frames = [UserStartedSpeakingFrame(), *_chunks(0.2, 5), UserStoppedSpeakingFrame(),
              TranscriptionFrame("ok", "user", "")]
    await run_test(MossUserTurnCapture(stub), frames_to_send=frames)
    assert stub.texts == ["ok"] and stub.audio == []
