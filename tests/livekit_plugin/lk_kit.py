"""Offline LiveKit test kit: a scripted streaming LLM and a real-time audio sink (no server).

Without `session.output.audio` an AgentSession never calls its TTS, so the sink matters: it paces
playback by the wall clock (optionally sped up), reports `playback_finished` with the position
reached when `clear_buffer()` interrupts it, exactly like RoomIO's output does.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents import APIConnectOptions, llm, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS
from livekit.agents.voice import Agent, AgentSession
from livekit.agents.voice.io import AudioInput, AudioOutput, AudioOutputCapabilities, TextOutput
from livekit.agents.voice.transcription import TranscriptSynchronizer


class ScriptedLLM(llm.LLM):
    """Replies with scripted texts, streamed word by word like a real LLM's token deltas."""

    def __init__(self, replies: list[str], *, delay_s: float = 0.005) -> None:
        super().__init__()
        self._replies = list(replies)
        self._delay_s = delay_s
        self.requests: list[llm.ChatContext] = []

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[Any] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        **_: Any,
    ) -> llm.LLMStream:
        self.requests.append(chat_ctx.copy())
        text = self._replies.pop(0) if self._replies else "Okay."
        return _ScriptedStream(
            self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options, text=text,
            delay_s=self._delay_s,
        )


class _ScriptedStream(llm.LLMStream):
    def __init__(self, llm_: ScriptedLLM, *, text: str, delay_s: float, **kw: Any) -> None:
        super().__init__(llm_, **kw)
        self._text = text
        self._delay_s = delay_s

    async def _run(self) -> None:
        request_id = utils.shortuuid()
        for token in re.findall(r"\s*\S+", self._text):
            delta = llm.ChoiceDelta(role="assistant", content=token)
            self._event_ch.send_nowait(llm.ChatChunk(id=request_id, delta=delta))
            await asyncio.sleep(self._delay_s)  # an LLM streams; this is its token pace


class RealtimeAudioOutput(AudioOutput):
    """An audio sink that plays in (scaled) real time and reports how far it got."""

    def __init__(self, *, speed: float = 1.0, max_ahead_s: float = 0.2) -> None:
        super().__init__(label="realtime-test", capabilities=AudioOutputCapabilities(pause=False))
        self._speed = speed
        self._max_ahead_s = max_ahead_s
        self._started_at: float | None = None  # monotonic start of the current segment
        self._pushed_s = 0.0
        self._finish_task: asyncio.Task[None] | None = None
        self.segments: list[list[rtc.AudioFrame]] = []
        self.finished: list[tuple[float, bool]] = []  # (playback_position, interrupted)
        self.segment_started = asyncio.Event()

    def _played_s(self) -> float:
        if self._started_at is None:
            return 0.0
        return min(self._pushed_s, (time.monotonic() - self._started_at) * self._speed)

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if self._started_at is None:
            task = self._finish_task
            if task is not None and not task.done():  # the previous segment still plays out
                await asyncio.wait([task])
            self._started_at = time.monotonic()
            self._pushed_s = 0.0
            self.segments.append([])
            self.on_playback_started(created_at=time.time())
            self.segment_started.set()
        self.segments[-1].append(frame)
        self._pushed_s += frame.duration
        ahead = self._pushed_s - self._played_s()
        if ahead > self._max_ahead_s:  # back-pressure like rtc.AudioSource's bounded queue
            await asyncio.sleep((ahead - self._max_ahead_s) / self._speed)

    def flush(self) -> None:
        super().flush()
        if self._started_at is None:
            return
        started, pushed = self._started_at, self._pushed_s
        self._finish_task = asyncio.create_task(self._play_out(started, pushed))

    async def _play_out(self, started: float, pushed: float) -> None:
        remaining = pushed / self._speed - (time.monotonic() - started)
        if remaining > 0:
            await asyncio.sleep(remaining)  # the audio plays until its end
        if self._started_at == started:
            self._end_segment(pushed, interrupted=False)

    def clear_buffer(self) -> None:
        if self._started_at is None:
            return
        if self._finish_task is not None and not self._finish_task.done():
            self._finish_task.cancel()
        self._end_segment(self._played_s(), interrupted=True)

    def _end_segment(self, position: float, *, interrupted: bool) -> None:
        self._started_at = None
        self.segment_started.clear()
        self.finished.append((position, interrupted))
        self.on_playback_finished(playback_position=position, interrupted=interrupted)

    async def aclose(self) -> None:
        if self._finish_task is not None:
            await utils.aio.cancel_and_wait(self._finish_task)


class ToneInput(AudioInput):
    """A microphone stand-in: 20 ms frames of a tone at 48 kHz, delivered in real time."""

    def __init__(self) -> None:
        super().__init__(label="tone-mic")
        self.frames = 0
        t = np.arange(960) / 48000
        self._pcm = (np.sin(2 * np.pi * 180 * t) * 8000).astype(np.int16).tobytes()

    async def __anext__(self) -> rtc.AudioFrame:
        await asyncio.sleep(0.02)  # a microphone's pace
        self.frames += 1
        return rtc.AudioFrame(
            data=self._pcm, sample_rate=48000, num_channels=1, samples_per_channel=960
        )


class CollectingTextOutput(TextOutput):
    """Collects the transcript LiveKit shows to the user (after synchronization)."""

    def __init__(self) -> None:
        super().__init__(label="collect-text", next_in_chain=None)
        self.text = ""
        self.flushes = 0

    async def capture_text(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        self.flushes += 1


def make_session(
    tts: Any,
    replies: list[str],
    *,
    speed: float = 1.0,
    token_delay_s: float = 0.005,
    **session_kw: Any,
) -> tuple[AgentSession, ScriptedLLM, RealtimeAudioOutput, CollectingTextOutput]:
    """An AgentSession wired like RoomIO: LLM -> TTS -> synchronizer -> real-time sink."""
    scripted = ScriptedLLM(replies, delay_s=token_delay_s)
    session: AgentSession = AgentSession(
        llm=scripted,
        tts=tts,
        vad=None,
        turn_handling={"turn_detection": None},
        use_tts_aligned_transcript=True,
        aec_warmup_duration=None,
        user_away_timeout=None,
        **session_kw,
    )
    audio, text = RealtimeAudioOutput(speed=speed), CollectingTextOutput()
    sync = TranscriptSynchronizer(next_in_chain_audio=audio, next_in_chain_text=text)
    session.output.audio = sync.audio_output
    session.output.transcription = sync.text_output
    return session, scripted, audio, text


def assistant_messages(session: AgentSession) -> list[llm.ChatMessage]:
    return [
        item
        for item in session.history.items
        if item.type == "message" and item.role == "assistant"
    ]


async def wait_until(predicate: Callable[[], bool], *, limit_s: float = 20.0) -> None:
    """Poll a condition that another task makes true (event-driven code under test)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def stream_in_speech(tts: Any, session: AgentSession, speech: Any) -> Any:
    """Open `tts.stream()` the way a reply task of `session` does (its speech in context), e.g.
    a preemptive reply that the session may later drop."""
    from livekit.agents.voice.agent_activity import (
        _AgentActivityContextVar,
        _SpeechHandleContextVar,
    )

    activity_token = _AgentActivityContextVar.set(session._activity)
    speech_token = _SpeechHandleContextVar.set(speech)
    try:
        return tts.stream()
    finally:
        _SpeechHandleContextVar.reset(speech_token)
        _AgentActivityContextVar.reset(activity_token)


def new_agent(instructions: str = "You are a helpful voice assistant.") -> Agent:
    return Agent(instructions=instructions)


class NumberedFrames(AudioInput):
    """An audio input of numbered 10 ms frames (sample value = frame index), read on demand: where
    each captured sample came from stays visible."""

    def __init__(self) -> None:
        super().__init__(label="frames")
        self.n = 0

    async def __anext__(self) -> rtc.AudioFrame:
        self.n += 1
        return rtc.AudioFrame(np.full(240, self.n, dtype=np.int16).tobytes(), 24000, 1, 240)
