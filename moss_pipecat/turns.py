"""What the listener heard, and what the user said: the two halves of a call's context.

MOSS-TTS-Realtime is trained on dialogues, so each reply should be conditioned on the earlier
turns as they were actually heard. Two Pipecat-specific pieces feed the engine's `Conversation`:

* `PlayoutClock` estimates how much of each assistant turn the listener has heard, so that an
  interrupted turn is kept only up to that point (`TurnStream.cancel(played_s=...)`).
* `MossUserTurnCapture`, placed after speech-to-text, records what the user said (and, if
  asked, how they said it) and stages it on the `MossTTSService`, which hands it to the
  conversation with `add_user_turn` right before the next reply starts.

How the played position is derived (the TTS never sees the speaker): the service hands audio
downstream faster than real time, and the output transport plays it first-in first-out at real
time. The clock therefore keeps a timeline of every audio frame the service pushed downstream
(per audio context, contiguous, since Pipecat plays contexts one after another) and runs a
playback cursor over it: the cursor starts moving at `BotStartedSpeakingFrame` (the transport
emits it when it writes the first chunk), never passes the end of the audio pushed so far (an
underrun restarts it when more audio arrives) and stops at `BotStoppedSpeakingFrame`. Error:
the transport's own buffering (one output chunk, 40 ms by default) and network jitter buffers
downstream of the transport (WebRTC, telephony: typically 20-100 ms) are not visible, so the
estimate runs slightly ahead of what reached the listener's ear.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from core.audio import int16_to_float
from core.speech_capture import MAX_SPEECH_S, PRE_ROLL_S, SpeechCapture
from core.values import UserTurn

if TYPE_CHECKING:
    from moss_pipecat.tts import MossTTSService


@dataclass(slots=True)
class _Segment:
    """One audio frame on the playout timeline (seconds since the clock was last reset)."""

    context_id: str
    start_s: float
    pcm: bytes  # int16 mono
    sample_rate: int

    @property
    def end_s(self) -> float:
        return self.start_s + len(self.pcm) / (2 * self.sample_rate)


class PlayoutClock:
    """Estimates the listener's playback position over the audio the service pushed downstream.

    Args:
        clock: Monotonic time source in seconds (tests pass a fake one).
        keep_s: Audio kept behind the cursor for `tail()`; older frames are dropped.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, keep_s: float = 1.0) -> None:
        self._clock = clock
        self._keep_s = keep_s
        self.reset()

    def reset(self) -> None:
        """Forget all audio: the transport dropped what it had queued (interruption)."""
        self._segments: deque[_Segment] = deque()
        self._spans: dict[str, tuple[float, float]] = {}  # context -> (start_s, end_s) timeline
        self._total_s = 0.0
        self._base_s = 0.0  # cursor position at `_anchor`
        self._anchor: float | None = None  # wall time the cursor started moving, None = stopped
        self._run_origin_s = 0.0  # cursor position when the current speaking run started
        self._dry_at: float | None = None  # while stopped: wall time the audio ran out
        self._stalls: dict[str, float] = {}  # context -> seconds its playback sat dry

    @property
    def playing(self) -> bool:
        """Whether the transport is believed to be playing audio right now."""
        return self._anchor is not None and self.position_s() < self._total_s

    def position_s(self) -> float:
        """The playback cursor on the timeline, never past the audio pushed so far."""
        if self._anchor is None:
            return self._base_s
        return min(self._total_s, self._base_s + self._clock() - self._anchor)

    def pushed(self, context_id: str, pcm: bytes, sample_rate: int) -> None:
        """Record an audio frame the service just pushed downstream."""
        if not pcm:
            return
        if context_id in self._spans:  # audio of this context resumes after a dry spell
            self._stalls[context_id] = self._stalls.get(context_id, 0.0) + self._idle_s()
        if self._anchor is not None and self.position_s() >= self._total_s:
            # Underrun: the transport ran dry and resumes with this frame.
            self._base_s, self._anchor = self._total_s, self._clock()
            self._run_origin_s = self._total_s
        segment = _Segment(context_id, self._total_s, pcm, sample_rate)
        self._segments.append(segment)
        start, _ = self._spans.get(context_id, (segment.start_s, segment.start_s))
        self._spans[context_id] = (start, segment.end_s)
        self._total_s = segment.end_s
        horizon = self.position_s() - self._keep_s
        while self._segments and self._segments[0].end_s < horizon:
            self._segments.popleft()

    def bot_started(self) -> None:
        """`BotStartedSpeakingFrame`: the transport started writing audio."""
        if self._anchor is None:
            self._anchor = self._clock()
            self._run_origin_s = self._base_s

    def bot_stopped(self) -> None:
        """`BotStoppedSpeakingFrame`: the transport stopped writing audio."""
        if self._anchor is not None:
            self._dry_at = min(self._clock(), self._anchor + self._total_s - self._base_s)
        self._base_s = self.position_s()
        self._anchor = None

    def _idle_s(self) -> float:
        """How long the listener has had nothing left to play (0 while audio is queued)."""
        if self._anchor is not None:
            dry = self._anchor + self._total_s - self._base_s
        elif self._dry_at is not None and self._base_s >= self._total_s:
            dry = self._dry_at
        else:
            return 0.0
        return max(0.0, self._clock() - dry)

    def stalled_s(self, context_id: str) -> float:
        """Seconds this context's playback sat dry between its audio frames (an LLM pause
        inside a reply): its later audio plays that much later than its own timeline says."""
        return self._stalls.get(context_id, 0.0)

    def pushed_s(self, context_id: str) -> float:
        """Seconds of this context's audio pushed downstream so far."""
        start, end = self._spans.get(context_id, (0.0, 0.0))
        return end - start

    def played_s(self, context_id: str) -> float:
        """Seconds of this context's audio the listener has heard (estimate)."""
        if context_id not in self._spans:
            return 0.0
        start, end = self._spans[context_id]
        return max(0.0, min(end, self.position_s()) - start)

    def tail(self, seconds: float, chunk_s: float) -> tuple[str, np.ndarray, int] | None:
        """The audio right after the chunk now being written, to fade out on interruption.

        The transport finishes writing its current output chunk (`chunk_s`, counted from the start
        of the speaking run) and drops the rest, so the fade continues the waveform from there.
        Returns (context_id, int16 samples, sample_rate) or None when nothing is playing.
        """
        if not self.playing:
            return None
        pos = self.position_s()
        rel = pos - self._run_origin_s
        cut = self._run_origin_s + (math.ceil(rel / chunk_s) * chunk_s if chunk_s > 0 else rel)
        for segment in self._segments:
            if segment.start_s <= cut < segment.end_s:
                samples = np.frombuffer(segment.pcm, dtype=np.int16)
                offset = int(round((cut - segment.start_s) * segment.sample_rate))
                count = max(1, int(round(seconds * segment.sample_rate)))
                return segment.context_id, samples[offset : offset + count], segment.sample_rate
        return None


def fade_out(samples: np.ndarray, pad_to: int) -> bytes:
    """Ramp int16 samples down to zero (raised cosine) and pad with silence to `pad_to` samples.

    The padding matters: Pipecat's output transport writes whole chunks only, and a partial
    chunk would wait in its buffer and be played in front of the next reply.
    """
    n = len(samples)
    ramp = 0.5 * (1.0 + np.cos(np.pi * (np.arange(n) + 1) / n)) if n else np.zeros(0)
    faded = (samples.astype(np.float32) * ramp).astype(np.int16)
    total = max(pad_to, n)
    out = np.zeros(total, dtype=np.int16)
    out[:n] = faded
    return out.tobytes()


@dataclass(slots=True)
class _Staged:
    texts: list[str] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    rate: int = 0


class UserTurnQueue:
    """User turns waiting for the reply they precede.

    What the user says is staged as it arrives; when a reply starts (`reply_started`), the staged
    words belong before that reply, even if its engine turn opens later and the user already
    speaks again. Replies are numbered in the order they started.
    """

    def __init__(self) -> None:
        self._staged = _Staged()
        self._bound: list[tuple[int, _Staged]] = []  # (reply number, user turn) not yet sent
        self._seq = 0
        self._reply_seq: dict[str, int] = {}

    def add_text(self, text: str) -> None:
        """Stage a final transcript of the user (blank ones carry nothing)."""
        if text.strip():
            self._staged.texts.append(text.strip())

    def add_audio(self, audio: np.ndarray, sample_rate: int) -> None:
        """Stage the user's speech (float32 mono); the engine resamples and encodes it."""
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if self._staged.audio and sample_rate != self._staged.rate:
            self._staged.audio.clear()  # rate changed mid-turn: keep the newest part only
        self._staged.audio.append(np.asarray(audio, dtype=np.float32).reshape(-1))
        self._staged.rate = sample_rate

    def reply_started(self, reply_id: str) -> None:
        """A reply begins: bind everything staged so far to it."""
        self._seq += 1
        self._reply_seq[reply_id] = self._seq
        if self._staged.texts or self._staged.audio:
            self._bound.append((self._seq, self._staged))
            self._staged = _Staged()

    def reply_seq(self, reply_id: str) -> int:
        """The reply's number (the latest for a reply that never announced its start)."""
        seq = self._reply_seq.pop(reply_id, self._seq)
        self._reply_seq = {r: s for r, s in self._reply_seq.items() if s > seq}
        return seq

    def put_back(self, seq: int, user: UserTurn) -> None:
        """A reply's request was refused (engine full): its user turn goes before the next."""
        audio = [] if user.audio is None else [np.asarray(user.audio, dtype=np.float32)]
        staged = _Staged([user.text] if user.text else [], audio, user.sample_rate or 0)
        self._bound.insert(0, (seq, staged))

    def take(self, seq: int) -> UserTurn | None:
        """The user turns bound to replies up to `seq`, merged (no reply was spoken between)."""
        ready = [user for s, user in self._bound if s <= seq]
        self._bound = [(s, user) for s, user in self._bound if s > seq]
        if not ready:
            return None
        rate = next((user.rate for user in reversed(ready) if user.audio), 0)  # newest speech's
        chunks = [a for user in ready for a in user.audio if user.rate == rate]
        audio = np.concatenate(chunks) if chunks else None
        text = " ".join(t for user in ready for t in user.texts)
        return UserTurn(text, audio, rate if audio is not None else None)


class MossUserTurnCapture(FrameProcessor):
    """Records each user turn and stages it on a `MossTTSService` for the next reply.

    Place it right after speech-to-text (`transport.input(), stt, MossUserTurnCapture(tts),
    user_aggregator, llm, tts, ...`). Final `TranscriptionFrame`s are collected as the user's
    words. With `capture_audio=True`, the user's speech (input audio between the user-started
    and user-stopped speaking frames, plus a short pre-roll because voice activity detection
    fires late) is kept too and encoded by the engine as the user turn's audio, which is how the
    model was trained. Everything is forwarded unchanged.

    Args:
        tts: The service whose conversation receives the user turns.
        capture_audio: Also record the user's speech audio.
        pre_roll_s: Audio kept from before the start of speech.
        max_audio_s: Longest user speech kept per turn (the rest is dropped).
    """

    def __init__(
        self,
        tts: MossTTSService,
        *,
        capture_audio: bool = False,
        pre_roll_s: float = PRE_ROLL_S,
        max_audio_s: float = MAX_SPEECH_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if pre_roll_s < 0 or max_audio_s <= 0:
            raise ValueError("pre_roll_s must be >= 0 and max_audio_s > 0")
        self._tts = tts
        self._capture_audio = capture_audio
        self._speech = SpeechCapture(pre_roll_s=pre_roll_s, max_s=max_audio_s, keep="first")

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Record transcripts and speech; pass every frame on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame) and frame.text.strip():
            self._tts.stage_user_text(frame.text)
        elif isinstance(frame, InputAudioRawFrame) and self._capture_audio:
            self._speech.feed(frame.audio, frame.sample_rate, frame.num_channels)
        elif isinstance(frame, (UserStartedSpeakingFrame, VADUserStartedSpeakingFrame)):
            self._speech.start()
        elif isinstance(frame, (UserStoppedSpeakingFrame, VADUserStoppedSpeakingFrame)):
            self._speech.stop()
            speech = self._speech.take()
            if speech is not None:
                self._tts.stage_user_audio(int16_to_float(speech[0]), speech[1])
        await self.push_frame(frame, direction)
