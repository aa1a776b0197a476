"""The user's speech of a turn, captured from a live input: the rules both plugins share.

MOSS-TTS-Realtime conditions a reply on the user's speech as well as their words, so each plugin
records what the user said from its framework's audio input. The rules for that audio are the
same everywhere and live here, free of any framework:

* pre-roll: the voice activity detector reports speech only after some of it, so the last
  `PRE_ROLL_S` heard before the start of speech are kept in front of it;
* cap: at most `MAX_SPEECH_S` of speech are kept until it is taken (the encoder's cost and the
  context grow with it); `keep` says whether the first or the newest audio stays;
* mono int16 at the input's own rate: channels are averaged, nothing is resampled here (the
  engine resamples when it encodes); when the input's rate changes, the audio recorded at the
  old rate is dropped, so what is taken is always one rate.

Lengths are counted in samples, not summed float seconds, so no drift moves a boundary.

Each start of speech opens a numbered stretch; `take` and `drop` may name stretches, which lets a
caller decide per stretch (LiveKit keeps only the speech that got words) while the cap still
counts all the audio held.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container
from dataclasses import dataclass
from typing import Literal

import numpy as np

PRE_ROLL_S = 0.3  # audio kept from before the detector said "speaking"
MAX_SPEECH_S = 30.0  # the most user speech held for one turn

Pcm = bytes | bytearray | memoryview | np.ndarray  # interleaved int16 samples


def to_mono(pcm: Pcm, channels: int = 1) -> np.ndarray:
    """Interleaved int16 PCM -> a mono int16 copy (channels averaged, truncated toward zero);
    a copy because frameworks reuse their frame buffers."""
    samples = np.frombuffer(pcm, dtype=np.int16)
    if channels == 1:
        return samples.copy()
    return samples.reshape(-1, channels).astype(np.int32).mean(axis=1).astype(np.int16)


@dataclass(frozen=True, slots=True)
class _Chunk:
    samples: np.ndarray  # int16 mono
    rate: int
    stretch: int


class SpeechCapture:
    """Records speech between `start` and `stop` from the audio `feed` sees, with its pre-roll.

    Args:
        pre_roll_s: Audio kept from before each start of speech.
        max_s: The most audio held (all stretches together) until it is taken.
        keep: Which audio stays past `max_s`. "first": audio that no longer fits is dropped (a
            long turn keeps its beginning); "last": the oldest audio goes first, never the newest
            chunk (a long turn keeps its end).
    """

    def __init__(
        self,
        *,
        pre_roll_s: float = PRE_ROLL_S,
        max_s: float = MAX_SPEECH_S,
        keep: Literal["first", "last"] = "first",
    ) -> None:
        if pre_roll_s < 0 or max_s <= 0:
            raise ValueError(f"pre_roll_s must be >= 0 and max_s > 0, got {pre_roll_s}, {max_s}")
        if keep not in ("first", "last"):
            raise ValueError(f"keep must be 'first' or 'last', got {keep!r}")
        self._pre_roll_s, self._max_s, self._keep = pre_roll_s, max_s, keep
        self._pre: deque[tuple[np.ndarray, int]] = deque()
        self._pre_n = 0  # samples in the pre-roll
        self._chunks: deque[_Chunk] = deque()
        self._n = 0  # samples held
        self._rate = 0  # the rate of the audio held
        self._stretch = 0
        self._speaking = False

    @property
    def speaking(self) -> bool:
        """Between `start` and `stop`."""
        return self._speaking

    def feed(self, pcm: Pcm, sample_rate: int, channels: int = 1) -> None:
        """Hear one frame of interleaved int16 PCM: recorded while speaking, else pre-roll."""
        samples = to_mono(pcm, channels)
        if not samples.size:
            return
        if self._speaking:
            self._record(samples, sample_rate)
            return
        self._pre.append((samples, sample_rate))
        self._pre_n += samples.size
        limit = round(self._pre_roll_s * sample_rate)
        while self._pre and self._pre_n - self._pre[0][0].size >= limit:
            self._pre_n -= self._pre.popleft()[0].size

    def start(self) -> int:
        """Speech started: the pre-roll is recorded, then every frame fed. Returns the number of
        the stretch now recording (a start while speaking changes nothing)."""
        if not self._speaking:
            self._speaking = True
            self._stretch += 1
            for samples, rate in self._pre:
                self._record(samples, rate)
            self._pre.clear()
            self._pre_n = 0
        return self._stretch

    def stop(self) -> None:
        """Speech stopped: frames fed from now on are pre-roll again."""
        self._speaking = False

    def take(self, stretches: Container[int] | None = None) -> tuple[np.ndarray, int] | None:
        """The speech held (of `stretches` only, when given), as mono int16 and its rate, and
        forgets it; None if there is none. A stretch still going on keeps recording."""
        taken = [c for c in self._chunks if stretches is None or c.stretch in stretches]
        self.drop(stretches)
        if not taken:
            return None
        return np.concatenate([c.samples for c in taken]), taken[0].rate

    def drop(self, stretches: Container[int] | None = None) -> None:
        """Forget the speech held (of `stretches` only, when given)."""
        if stretches is None:
            self._chunks.clear()
        else:
            self._chunks = deque(c for c in self._chunks if c.stretch not in stretches)
        self._n = sum(c.samples.size for c in self._chunks)

    def _record(self, samples: np.ndarray, rate: int) -> None:
        if self._chunks and rate != self._rate:
            self.drop()  # the input's rate changed: keep one rate, the newest
        self._rate = rate
        limit = round(self._max_s * rate)
        if self._keep == "first" and self._n + samples.size > limit:
            return
        self._chunks.append(_Chunk(samples, rate, self._stretch))
        self._n += samples.size
        while self._n > limit and len(self._chunks) > 1:  # keep == "last"
            self._n -= self._chunks.popleft().samples.size
