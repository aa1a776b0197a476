"""The user's speech of the current turn, tapped from the session's audio input.

MOSS-TTS-Realtime conditions a reply on the user's words AND, when given, their speech (encoded by
the codec), which carries tone and pace. LiveKit has no event with the user's audio, so the tap
sits in the session's input chain: it passes every frame on unchanged and keeps the frames heard
while the session says the user is speaking (VAD), with the 0.3 s before (the VAD reports speech
only after some of it), until the next user turn takes them.

Each stretch of VAD speech is kept as a segment of its own, marked when a transcript with words
arrives for it. A segment without words is a sound LiveKit never makes a user turn of (a cough,
an "mm-hm" under the agent's reply, noise): when the session transcribes the user, the next turn
takes only the segments with words, and the others are dropped instead of piling up in front of
it. A false interruption (LiveKit resumed the agent: the speech was not a turn) drops the
finished segments without words at once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from livekit import rtc
from livekit.agents.voice.io import AudioInput

MAX_USER_AUDIO_S = 30.0  # a user turn longer than this keeps its last 30 s
PRE_ROLL_S = 0.3  # audio kept from before the VAD said "speaking" (as the Pipecat capture)
# A transcript arriving this soon after a segment's VAD end may still be that segment's: streaming
# STTs often finalize after the VAD's end of speech, and the user may have started again already.
LATE_TRANSCRIPT_S = 2.5
# Words may also reach LiveKit a moment before its VAD reports the speech they belong to.
EARLY_TRANSCRIPT_S = 1.0


@dataclass(slots=True)
class _Segment:
    """One stretch of VAD speech (with its pre-roll)."""

    frames: deque[rtc.AudioFrame] = field(default_factory=deque)
    seconds: float = 0.0
    words: bool = False  # a transcript with words arrived for it
    ended_at: float | None = None  # monotonic time of its VAD end; None while it lasts


class UserAudioTap(AudioInput):
    """Pass-through `AudioInput` recording frames while `recording` is set."""

    def __init__(
        self,
        source: AudioInput,
        *,
        max_s: float = MAX_USER_AUDIO_S,
        pre_roll_s: float = PRE_ROLL_S,
        late_transcript_s: float = LATE_TRANSCRIPT_S,
    ) -> None:
        super().__init__(label="moss-user-audio", source=source)
        self._max_s, self._pre_roll_s = max_s, pre_roll_s
        self._late_s = late_transcript_s
        self._segments: deque[_Segment] = deque()  # oldest first; the last may be open
        self._seconds = 0.0
        self._pre: deque[rtc.AudioFrame] = deque()  # the last `pre_roll_s` while not recording
        self._recording = False
        self._loose_words_at: float | None = None  # words heard while silent, not yet placed

    @property
    def recording(self) -> bool:
        return self._recording

    @recording.setter
    def recording(self, on: bool) -> None:
        if on and not self._recording:  # a new segment; speech began a little before the VAD
            early = self._place_loose_words(speech_starts=True)
            self._segments.append(_Segment(words=early))
            for frame in self._pre:
                self._keep(frame)
        elif not on and self._recording and self._segments:
            self._segments[-1].ended_at = time.monotonic()
        self._pre.clear()
        self._recording = on

    async def __anext__(self) -> rtc.AudioFrame:
        frame = await super().__anext__()
        if self._recording:
            self._keep(frame)
        else:
            self._pre.append(frame)
            while self._pre and (
                sum(f.duration for f in self._pre) - self._pre[0].duration >= self._pre_roll_s
            ):
                self._pre.popleft()
        return frame

    def _keep(self, frame: rtc.AudioFrame) -> None:
        if not self._segments or self._segments[-1].ended_at is not None:
            self._segments.append(_Segment())  # never raise in the session's input chain
        segment = self._segments[-1]
        segment.frames.append(frame)
        segment.seconds += frame.duration
        self._seconds += frame.duration
        while self._seconds > self._max_s:  # the oldest audio goes first, never the newest
            oldest = self._segments[0]
            if oldest is segment and len(oldest.frames) <= 1:
                break
            if oldest.frames:
                dropped = oldest.frames.popleft()
                oldest.seconds -= dropped.duration
                self._seconds -= dropped.duration
            if not oldest.frames and oldest is not segment:
                self._segments.popleft()

    def words_heard(self) -> None:
        """A transcript with words arrived: it belongs to the speech going on or to speech that
        ended moments ago. Words heard while the user has been silent for a while are either
        early (speech the VAD reports a moment later: they belong to it) or late (a slow
        recognizer, transcripts LiveKit held back while the agent spoke: they belong to the last
        speech); the next start of speech or `take` tells which."""
        now = time.monotonic()
        placed = False
        for segment in self._segments:
            if segment.ended_at is None or now - segment.ended_at <= self._late_s:
                segment.words = placed = True
        if not placed:
            self._loose_words_at = now

    def _place_loose_words(self, *, speech_starts: bool) -> bool:
        """Place words heard while silent; True when they are early words of speech starting."""
        at, self._loose_words_at = self._loose_words_at, None
        if at is None:
            return False
        if speech_starts and time.monotonic() - at <= EARLY_TRANSCRIPT_S:
            return True
        if self._segments and self._segments[-1].ended_at is not None:
            self._segments[-1].words = True  # late words of the last speech
        return False

    def drop_wordless(self) -> None:
        """Forget the finished segments that got no words (LiveKit made no turn of them)."""
        self._place_loose_words(speech_starts=False)
        kept = deque(s for s in self._segments if s.words or s.ended_at is None)
        self._segments = kept
        self._seconds = sum(s.seconds for s in kept)

    def take(self, *, words_only: bool = False) -> tuple[np.ndarray, int] | None:
        """The speech recorded since the last call, as mono int16 and its rate; None if none.

        `words_only`: only segments that got words (the session transcribes the user); the
        finished ones without words are dropped, one still going on stays for the next turn.
        """
        self._place_loose_words(speech_starts=False)
        frames: list[rtc.AudioFrame] = []
        left: deque[_Segment] = deque()
        for segment in self._segments:
            if words_only and not segment.words:
                if segment.ended_at is None:
                    left.append(segment)
                continue
            frames.extend(segment.frames)
            if segment.ended_at is None:  # still speaking: the rest goes to the next turn
                left.append(_Segment(words=segment.words))
        self._segments = left
        self._seconds = sum(s.seconds for s in left)
        frames = [f for f in frames if f.samples_per_channel > 0]
        if not frames:
            return None
        rate = frames[0].sample_rate
        frames = [f for f in frames if f.sample_rate == rate]  # a rate change mid-turn: keep one
        pcm = np.concatenate([_mono(f) for f in frames])
        return pcm, rate


def _mono(frame: rtc.AudioFrame) -> np.ndarray:
    samples = np.frombuffer(frame.data, dtype=np.int16)
    if frame.num_channels == 1:
        return samples.copy()
    mixed = samples.reshape(-1, frame.num_channels).astype(np.int32).mean(axis=1)
    return mixed.astype(np.int16)
