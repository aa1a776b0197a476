"""The user's speech given to the MOSS conversation, through LiveKit's real audio pipeline: an
AgentSession with a VAD and a streaming STT (small implementations of LiveKit's interfaces that
recognise marked test audio), VAD turn detection, and a microphone of numbered frames, so every
sample that reaches the conversation can be traced to the moment it was spoken."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import stt, utils, vad
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions
from livekit.agents.voice import AgentSession
from livekit.agents.voice.io import AudioInput, AudioOutputCapabilities
from livekit.agents.voice.transcription import TranscriptSynchronizer
from lk_kit import (
    CollectingTextOutput,
    NumberedFrames,
    RealtimeAudioOutput,
    ScriptedLLM,
    new_agent,
    wait_until,
)

from core import Conversation, UserTurn
from moss_livekit import TTS
from moss_livekit.user_audio import UserAudioTap

RATE = 24000
FRAME = 480  # 20 ms
LOUD = 1000  # the VAD's threshold on the mean absolute sample
# Sample values of the microphone's frames: quiet frames carry (index % 100), sounds carry
# BAND + index, so any sample names its kind and the frame it came from.
SOUND_BAND = 10000  # a short sound the STT recognises no word in ("mm", a cough, a noise)
WORDS_BAND = 20000  # speech the STT transcribes


class NumberedMic(AudioInput):
    """A microphone in real time: 20 ms frames, quiet unless the test makes the user speak."""

    def __init__(self) -> None:
        super().__init__(label="numbered-mic")
        self.index = 0
        self._queue: list[tuple[int, set[int]]] = []  # (band, its utterance) of frames to come
        self.spoken: dict[int, set[int]] = {SOUND_BAND: set(), WORDS_BAND: set()}

    def say(self, band: int, seconds: float) -> set[int]:
        """Queue an utterance; returns the set its sample values will be added to."""
        values: set[int] = set()
        self._queue.extend([(band, values)] * round(seconds / 0.02))
        return values

    @property
    def quiet(self) -> bool:
        return not self._queue

    async def __anext__(self) -> rtc.AudioFrame:
        await asyncio.sleep(0.02)
        self.index += 1
        if self._queue:
            band, values = self._queue.pop(0)
            value = band + self.index
            values.add(value)
            self.spoken[band].add(value)
        else:
            value = self.index % 100
        data = np.full(FRAME, value, dtype=np.int16).tobytes()
        return rtc.AudioFrame(data, RATE, 1, FRAME)


def _level(frame: rtc.AudioFrame) -> int:
    return int(np.abs(np.frombuffer(frame.data, dtype=np.int16).astype(np.int32)).mean())


class EnergyVAD(vad.VAD):
    """LiveKit's VAD interface over frame energy: speech after 60 ms above the threshold, its end
    after 300 ms below (the events carry what silero's do)."""

    def __init__(self) -> None:
        super().__init__(capabilities=vad.VADCapabilities(update_interval=0.02))

    def stream(self) -> vad.VADStream:
        return _EnergyVADStream(self)


class _EnergyVADStream(vad.VADStream):
    MIN_SPEECH_S, MIN_SILENCE_S = 0.06, 0.3

    def __init__(self, vad_: EnergyVAD) -> None:
        self._reset()
        self._samples = 0
        super().__init__(vad_)

    def _reset(self) -> None:
        self._speaking = False
        self._speech_s = self._silence_s = self._raw_speech = self._raw_silence = 0.0

    def _event(self, kind: vad.VADEventType, frame: rtc.AudioFrame, loud: bool) -> vad.VADEvent:
        return vad.VADEvent(
            type=kind, samples_index=self._samples, timestamp=time.time(),
            speech_duration=self._speech_s, silence_duration=self._silence_s, frames=[frame],
            probability=1.0 if loud else 0.0, inference_duration=0.0, speaking=self._speaking,
            raw_accumulated_silence=self._raw_silence, raw_accumulated_speech=self._raw_speech,
        )

    async def _main_task(self) -> None:
        async for frame in self._input_ch:
            if isinstance(frame, self._FlushSentinel):
                self._reset()
                continue
            loud = _level(frame) > LOUD
            self._samples += frame.samples_per_channel
            if loud:
                self._raw_speech, self._raw_silence = self._raw_speech + frame.duration, 0.0
            else:
                self._raw_speech, self._raw_silence = 0.0, self._raw_silence + frame.duration
            if self._speaking:
                self._speech_s += frame.duration if loud else 0.0
                self._silence_s = 0.0 if loud else self._silence_s + frame.duration
            if not self._speaking and self._raw_speech >= self.MIN_SPEECH_S:
                self._speaking, self._speech_s, self._silence_s = True, self._raw_speech, 0.0
                self._event_ch.send_nowait(
                    self._event(vad.VADEventType.START_OF_SPEECH, frame, loud))
            elif self._speaking and self._raw_silence >= self.MIN_SILENCE_S:
                self._speaking = False
                self._event_ch.send_nowait(
                    self._event(vad.VADEventType.END_OF_SPEECH, frame, loud))
                self._speech_s = self._silence_s = 0.0
            self._event_ch.send_nowait(self._event(vad.VADEventType.INFERENCE_DONE, frame, loud))


class MarkedSpeechSTT(stt.STT):
    """LiveKit's streaming STT interface: it recognises the next scripted sentence in each run of
    WORDS_BAND frames (interim results while they last, the final transcript 100 ms after), and
    no word at all in SOUND_BAND frames, like a recogniser given a cough or an "mm"."""

    def __init__(self, sentences: list[str]) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=True, interim_results=True))
        self.sentences = list(sentences)
        self.finals: list[str] = []

    async def _recognize_impl(self, buffer, *, language=NOT_GIVEN, conn_options):  # noqa: ANN001, ANN202
        raise NotImplementedError("streaming only")

    def stream(
        self, *, language: str | None = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.RecognizeStream:
        return _MarkedSpeechStream(stt=self, conn_options=conn_options)


class _MarkedSpeechStream(stt.RecognizeStream):
    async def _run(self) -> None:
        owner: MarkedSpeechSTT = self._stt  # type: ignore[assignment]
        words_s = quiet_s = 0.0
        for_words = False
        async for item in self._input_ch:
            if isinstance(item, self._FlushSentinel):
                continue
            value = int(np.frombuffer(item.data, dtype=np.int16)[0])
            if value >= WORDS_BAND:
                for_words, quiet_s = True, 0.0
                words_s += item.duration
                if round(words_s / 0.02) % 10 == 1:  # an interim result every 200 ms
                    self._send(stt.SpeechEventType.INTERIM_TRANSCRIPT, owner.sentences[0][:5])
            elif for_words:
                quiet_s += item.duration
                if quiet_s >= 0.1:
                    text = owner.sentences.pop(0)
                    owner.finals.append(text)
                    self._send(stt.SpeechEventType.FINAL_TRANSCRIPT, text)
                    for_words, words_s = False, 0.0

    def _send(self, kind: stt.SpeechEventType, text: str) -> None:
        self._event_ch.send_nowait(stt.SpeechEvent(
            type=kind, request_id=utils.shortuuid(),
            alternatives=[stt.SpeechData(language="en", text=text, confidence=1.0)],
        ))


class PausableAudioOutput(RealtimeAudioOutput):
    """The real-time sink, able to pause like RoomIO's output: LiveKit then pauses a reply when
    the user starts to speak and resumes it if no user turn follows (a false interruption)."""

    def __init__(self, *, speed: float = 1.0) -> None:
        super().__init__(speed=speed)
        self._capabilities = AudioOutputCapabilities(pause=True)
        self._paused_at: float | None = None
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self.pauses = 0

    def _played_s(self) -> float:
        if self._started_at is None:
            return 0.0
        now = self._paused_at if self._paused_at is not None else time.monotonic()
        return max(0.0, min(self._pushed_s, (now - self._started_at) * self._speed))

    def pause(self) -> None:
        super().pause()
        if self._paused_at is None:
            self._paused_at = time.monotonic()
            self._unpaused.clear()
            self.pauses += 1

    def resume(self) -> None:
        super().resume()
        if self._paused_at is not None:
            if self._started_at is not None:
                self._started_at += time.monotonic() - self._paused_at
            self._paused_at = None
            self._unpaused.set()

    async def _play_out(self, started: float, pushed: float) -> None:
        segment = len(self.segments)
        while self._started_at is not None and len(self.segments) == segment:
            remaining = (pushed - self._played_s()) / self._speed
            if remaining <= 0:
                self._end_segment(pushed, interrupted=False)
                return
            await self._unpaused.wait()  # a paused output holds its audio
            await asyncio.sleep(remaining)


def _session(plugin: TTS, replies: list[str], sentences: list[str], *,  # noqa: ANN202
             output: RealtimeAudioOutput | None = None, **interruption: object):
    """An AgentSession wired like RoomIO (VAD, STT, LLM, MOSS, real-time audio output), with VAD
    turn detection and LiveKit's own interruption rules."""
    session: AgentSession = AgentSession(
        llm=ScriptedLLM(replies), tts=plugin, vad=EnergyVAD(), stt=MarkedSpeechSTT(sentences),
        turn_handling={
            "turn_detection": "vad",
            "endpointing": {"min_delay": 0.3, "max_delay": 1.0},
            "interruption": {"mode": "vad", "min_duration": 0.5, **interruption},
            "preemptive_generation": {"enabled": False},
        },
        use_tts_aligned_transcript=True, aec_warmup_duration=None, user_away_timeout=None,
    )
    audio, text = output or RealtimeAudioOutput(speed=2.0), CollectingTextOutput()
    sync = TranscriptSynchronizer(next_in_chain_audio=audio, next_in_chain_text=text)
    session.output.audio = sync.audio_output
    session.output.transcription = sync.text_output
    mic = NumberedMic()
    session.input.audio = mic
    return session, mic, audio


@pytest.fixture
def user_turns(monkeypatch):  # noqa: ANN001, ANN201
    """Every user turn handed to an engine conversation: (text, int16 samples or None)."""
    seen: list[tuple[str, np.ndarray | None]] = []
    original = Conversation.speak

    def speak(self, *, user=(), **kwargs):  # noqa: ANN001, ANN202 - the user turns of a request
        for turn in (user,) if isinstance(user, UserTurn) else user:
            pcm = None if turn.audio is None else np.asarray(turn.audio, dtype=np.int16).copy()
            seen.append((turn.text, pcm))
        return original(self, user=user, **kwargs)

    monkeypatch.setattr(Conversation, "speak", speak)
    return seen


async def test_a_sound_that_never_became_a_turn_is_not_given_with_the_next_one(
    engine, user_turns
) -> None:
    """Prevents: a short sound of the user that LiveKit never made a user turn of (VAD speech
    with no words: an "mm", a cough, a backchannel under the agent's reply) piling up, with the
    pre-roll and trailing silence kept around it, in front of the next real user turn's audio."""
    plugin = TTS(engine=engine)
    session, mic, audio = _session(
        plugin, ["Once upon a time there was a lighthouse by the sea.", "It is noon."],
        ["tell me a story", "what time is it"],
    )
    await session.start(new_agent())
    try:
        plugin.attach(session)
        words_one = mic.say(WORDS_BAND, 0.8)  # the first real turn
        await wait_until(lambda: audio.segment_started.is_set(), limit_s=20.0)
        sound = mic.say(SOUND_BAND, 0.3)  # "mm-hm" while the agent speaks: too short to interrupt
        await wait_until(lambda: mic.quiet and session.user_state == "listening")
        sound_ended = time.monotonic()
        await wait_until(lambda: len(audio.finished) == 1, limit_s=20.0)
        assert not audio.finished[0][1]  # the reply was not interrupted by the sound
        await asyncio.sleep(max(0.0, sound_ended + 3.0 - time.monotonic()))
        words_two = mic.say(WORDS_BAND, 0.8)  # the second real turn
        await wait_until(lambda: len(audio.finished) == 2, limit_s=20.0)

        users = [m.text_content for m in session.history.items
                 if m.type == "message" and m.role == "user"]
        assert users == ["tell me a story", "what time is it"]  # LiveKit made no turn of it
        roles = [t.role for t in plugin.conversation(session).turns]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert [text for text, _ in user_turns] == users
        first, second = (set(pcm.tolist()) for _, pcm in user_turns)
        assert words_one <= first and words_two <= second  # every frame of the words is there
        assert sound and not sound & first
        leaked = sorted(sound & second)
        assert not leaked, f"{len(leaked)} frames of the ignored sound came with turn two"
        assert len(user_turns[1][1]) / RATE < 2.0  # its words (0.8 s) and margins, no more
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


async def test_the_sound_of_a_false_interruption_is_not_given_with_the_next_turn(
    engine, user_turns
) -> None:
    """Prevents: a sound long enough to pause the agent's reply, which LiveKit then declares a
    false interruption (no words came, the reply resumes), being given to the model as part of
    the next real user turn."""
    plugin = TTS(engine=engine)
    output = PausableAudioOutput(speed=1.0)
    session, mic, audio = _session(
        plugin, ["Once upon a time there was a lighthouse by the sea.", "It is noon."],
        ["tell me a story", "what time is it"], output=output,
        false_interruption_timeout=0.5, resume_false_interruption=True,
    )
    false_interruptions: list = []
    session.on("agent_false_interruption", false_interruptions.append)
    await session.start(new_agent())
    try:
        plugin.attach(session)
        mic.say(WORDS_BAND, 0.8)
        await wait_until(lambda: audio.segment_started.is_set(), limit_s=20.0)
        await wait_until(lambda: audio._played_s() >= 0.2)
        sound = mic.say(SOUND_BAND, 0.7)  # long enough to pause the reply; no words in it
        await wait_until(lambda: bool(false_interruptions), limit_s=10.0)
        sound_ended = time.monotonic()
        assert output.pauses >= 1 and false_interruptions[0].resumed
        await wait_until(lambda: len(audio.finished) == 1, limit_s=20.0)
        assert not audio.finished[0][1]  # the reply resumed and played to its end
        await asyncio.sleep(max(0.0, sound_ended + 3.0 - time.monotonic()))
        words_two = mic.say(WORDS_BAND, 0.8)
        await wait_until(lambda: len(audio.finished) == 2, limit_s=20.0)

        users = [m.text_content for m in session.history.items
                 if m.type == "message" and m.role == "user"]
        assert users == ["tell me a story", "what time is it"]
        assert [text for text, _ in user_turns] == users
        second = set(user_turns[1][1].tolist())
        assert words_two <= second
        leaked = sorted(sound & second)
        assert sound and not leaked, (
            f"{len(leaked)} frames of the false interruption came with turn two")
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


async def _speech(tap: UserAudioTap, frames: int) -> list[int]:
    """The VAD reports `frames` frames of speech; returns their numbers."""
    tap.recording = True
    numbers = [int(np.frombuffer((await tap.__anext__()).data, np.int16)[0])
               for _ in range(frames)]
    tap.recording = False
    return numbers


async def test_words_that_come_late_keep_their_speech_and_a_wordless_sound_is_dropped() -> None:
    """Prevents: a slow recognizer's transcript (arriving while the user is silent, long after
    the VAD's end of speech) losing the user's speech, or a wordless sound before it being
    given with the turn."""
    tap = UserAudioTap(NumberedFrames(), pre_roll_s=0.0, late_transcript_s=0.05)
    await _speech(tap, 10)  # a sound: no transcript ever comes for it
    for _ in range(50):
        await tap.__anext__()
    words = await _speech(tap, 30)
    await asyncio.sleep(0.1)  # later than `late_transcript_s`
    tap.words_heard()
    pcm, _ = tap.take(words_only=True)
    assert pcm.reshape(-1, 240)[:, 0].tolist() == words
    assert tap.take(words_only=True) is None


async def test_words_that_come_before_the_vad_go_with_the_speech_that_starts() -> None:
    """Prevents: the first transcript of new speech, when it reaches LiveKit a moment before its
    VAD reports that speech, being credited to an earlier wordless sound (which would then be
    given with the turn)."""
    tap = UserAudioTap(NumberedFrames(), pre_roll_s=0.0, late_transcript_s=0.05)
    await _speech(tap, 10)  # a sound: no transcript ever comes for it
    await asyncio.sleep(0.1)
    tap.words_heard()  # the recognizer is ahead of the VAD ...
    words = await _speech(tap, 30)  # ... which reports the speech now
    pcm, _ = tap.take(words_only=True)
    assert pcm.reshape(-1, 240)[:, 0].tolist() == words
