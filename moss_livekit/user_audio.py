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

The audio rules (pre-roll, the cap, mono, one rate) are `core.speech_capture`'s; each segment is
one of its stretches, and the cap keeps the newest audio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from livekit import rtc
from livekit.agents.voice.io import AudioInput

from core.speech_capture import MAX_SPEECH_S, PRE_ROLL_S, SpeechCapture

# A transcript arriving this soon after a segment's VAD end may still be that segment's: streaming
# STTs often finalize after the VAD's end of speech, and the user may have started again already.
LATE_TRANSCRIPT_S = 2.5
# Words may also reach LiveKit a moment before its VAD reports the speech they belong to.
EARLY_TRANSCRIPT_S = 1.0


@dataclass(slots=True)
class _Segment:
    """One stretch of VAD speech: what LiveKit said of it (its audio is in the capture)."""

    words: bool = False  # a transcript with words arrived for it
    ended_at: float | None = None  # monotonic time of its VAD end; None while it lasts


class UserAudioTap(AudioInput):
    """Pass-through `AudioInput` recording frames while `recording` is set."""

    def __init__(
        self,
        source: AudioInput,
        *,
        max_s: float = MAX_SPEECH_S,
        pre_roll_s: float = PRE_ROLL_S,
        late_transcript_s: float = LATE_TRANSCRIPT_S,
    ) -> None:
        super().__init__(label="moss-user-audio", source=source)
        # a long turn keeps its last `max_s`, the speech nearest the reply
        self._speech = SpeechCapture(pre_roll_s=pre_roll_s, max_s=max_s, keep="last")
        self._late_s = late_transcript_s
        self._segments: dict[int, _Segment] = {}  # by stretch number, oldest first
        self._loose_words_at: float | None = None  # words heard while silent, not yet placed

    @property
    def recording(self) -> bool:
        return self._speech.speaking

    @recording.setter
    def recording(self, on: bool) -> None:
        if on and not self._speech.speaking:  # a new segment; speech began a little before
            early = self._place_loose_words(speech_starts=True)
            self._segments[self._speech.start()] = _Segment(words=early)
        elif not on and self._speech.speaking:
            self._speech.stop()
            if (last := self._last()) is not None:
                last.ended_at = time.monotonic()

    async def __anext__(self) -> rtc.AudioFrame:
        frame = await super().__anext__()
        self._speech.feed(frame.data, frame.sample_rate, frame.num_channels)
        return frame

    def _last(self) -> _Segment | None:
        return next(reversed(self._segments.values()), None)

    def words_heard(self) -> None:
        """A transcript with words arrived: it belongs to the speech going on or to speech that
        ended moments ago. Words heard while the user has been silent for a while are either
        early (speech the VAD reports a moment later: they belong to it) or late (a slow
        recognizer, transcripts LiveKit held back while the agent spoke: they belong to the last
        speech); the next start of speech or `take` tells which."""
        now = time.monotonic()
        placed = False
        for segment in self._segments.values():
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
        last = self._last()
        if last is not None and last.ended_at is not None:
            last.words = True  # late words of the last speech
        return False

    def drop_wordless(self) -> None:
        """Forget the finished segments that got no words (LiveKit made no turn of them)."""
        self._place_loose_words(speech_starts=False)
        self._forget({n for n in self._ended() if not self._segments[n].words})

    def take(self, *, words_only: bool = False) -> tuple[np.ndarray, int] | None:
        """The speech recorded since the last call, as mono int16 and its rate; None if none.

        `words_only`: only segments that got words (the session transcribes the user); the
        finished ones without words are dropped, one still going on stays for the next turn.
        """
        self._place_loose_words(speech_starts=False)
        chosen = {n for n, s in self._segments.items() if s.words or not words_only}
        speech = self._speech.take(chosen)  # one still going on goes on recording
        self._forget(self._ended())
        return speech

    def _ended(self) -> set[int]:
        return {n for n, s in self._segments.items() if s.ended_at is not None}

    def _forget(self, numbers: set[int]) -> None:
        self._speech.drop(numbers)
        self._segments = {n: s for n, s in self._segments.items() if n not in numbers}
