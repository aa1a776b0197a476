"""Word timings estimated from the audio, because MOSS-TTS-Realtime has no alignment.

The text column runs 12 tokens ahead of the audio at 12.5 tokens/s, so the token schedule says
nothing about when a word is spoken. `WordTimingEstimator` lays the turn's words out on a
speaking-rate model and corrects it with the pauses it hears:

* Each word gets a nominal duration from its syllables (Latin/Cyrillic vowel groups, one per
  Han/kana character or Hangul syllable, ~1.2 per digit, 0 for punctuation) at
  `syllables_per_s` (4.5 by default; a conversation can pass the previous turn's
  `measured_syllables_per_s`), plus a nominal pause after clause (0.15 s) and sentence (0.35 s)
  punctuation or a line break.
* With per-frame RMS energy (recommended), the layout runs on a "voiced clock" that advances only
  on frames louder than `max(silence_floor, silence_ratio * loudest frame so far)`, so leading
  silence and pauses come from the audio. When a pause of at least `pause_frames` frames ends,
  the nearest word boundary within a window that grows with the distance since the last pause
  (sentence ends preferred for long pauses, clause marks for short ones) is moved onto it, the
  words before it are released stretched to fit, and the speaking rate is re-estimated from all
  speech so far (shrunk towards the prior). Without energy every frame counts as voiced and
  nothing corrects the rate until the end.
* A word is released once its text is complete (the next word has begun, or `end_text`) and the
  audio is past its estimated end by a `hold_back` fraction (0.5) of its distance from the last
  pause, so that a slower voice can still be re-synced before its words are released. Released
  timings are final: monotonic, cumulative from the turn's first frame, never revised, never
  ahead of the audio emitted.
* `end_audio` (EOS or frame cap) stretches the words not yet released into the remaining voiced
  time, so the total always matches the audio.

Expected error (word starts, measured on a synthetic benchmark: three texts, true rate 3.6/4.5/5.4
syllables/s, +-20% jitter per word, pauses at punctuation): with energy, mean 0.03-0.09 s and
p90 <= 0.23 s when the text has punctuation; text without punctuation drifts with the rate error
until the end (mean 0.1 s at the prior rate, 0.4-0.8 s at +-20%). Without energy, mean 0.35 s at
the prior rate and 0.6-2 s at +-20%. `heard_text` counts a word as heard once playback passed its
estimated midpoint.

Word strings concatenate back to the pushed text exactly: a word is its core (letters, digits
and attached punctuation; one character for Han and kana, with its trailing punctuation) plus
the whitespace after it; whitespace before the first word belongs to the first word.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

FRAME_S = 0.08  # one codec frame: 1920 samples at 24 kHz
_CJK = (
    "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
    "\U00020000-\U0003134f"
)
_WORD = re.compile(rf"(?:[{_CJK}][^\s\w]*|[^\s{_CJK}]+)\s*")
_VOWELS = re.compile(r"[aeiouyàáâãäåæèéêëìíîïòóôõöøùúûüýÿœāēėęīįōūаеёиоуыэюяіїєү]+", re.I)
_LETTER = re.compile(r"[^\W\d_]")
_SPACE = re.compile(r"\s*")
_CLAUSE = tuple(",;:，；：、-–—")
_SENTENCE = tuple(".!?。！？…")
_SYMBOL_SYLLABLES = {"%": 2.0, "&": 1.0, "$": 2.0, "€": 2.0, "£": 1.0, "@": 1.0, "+": 1.0, "=": 2.0}


_PRIOR_S = 1.5  # weight of the prior speaking rate, in seconds of speech


def _affinity(nominal_pause: float, pause_s: float) -> float:
    """How strongly a word's punctuation attracts a measured pause, in search-window units: long
    pauses go to sentence ends, short ones to clause marks."""
    if nominal_pause <= 0:
        return 0.0
    return 1.0 if (nominal_pause >= 0.3) == (pause_s >= 0.3) else 0.6


@dataclass(frozen=True, slots=True)
class WordTiming:
    """One word of the turn's text with its estimated time span in the turn's audio."""

    word: str
    start_s: float
    end_s: float


@dataclass(slots=True)
class _Word:
    text: str
    dur: float  # nominal speech seconds
    pause: float  # nominal pause after it (used only without energy)


def syllables(word: str) -> float:
    """Rough syllable count of one word (its core; whitespace is ignored)."""
    core = word.strip()
    if re.fullmatch(f"[{_CJK}].*", core, re.S):
        return 1.0
    total = 1.2 * sum(ch.isdigit() for ch in core)
    total += sum(_SYMBOL_SYLLABLES.get(ch, 0.0) for ch in core)
    hangul = sum("\uac00" <= ch <= "\ud7a3" for ch in core)
    vowel_groups = len(_VOWELS.findall(core))
    if vowel_groups > 1 and re.search(r"[^aeiouyl]e\W*$", core, re.I):
        vowel_groups -= 1  # silent final e: "make", "there"
    other = len(_LETTER.findall(core)) - hangul
    if vowel_groups:
        total += vowel_groups
    elif other:
        total += max(1.0, other / 3)  # scripts without vowel letters we know: ~3 letters each
    return total + hangul


class WordTimingEstimator:
    """Streams word timings for one assistant turn (see the module docstring for the model)."""

    def __init__(
        self,
        *,
        syllables_per_s: float = 4.5,
        frame_s: float = FRAME_S,
        silence_floor: float = 1e-3,
        silence_ratio: float = 0.05,
        pause_frames: int = 2,
        hold_back: float = 0.5,
    ) -> None:
        if syllables_per_s <= 0 or frame_s <= 0 or pause_frames < 1:
            raise ValueError("syllables_per_s, frame_s and pause_frames must be positive")
        self.syllables_per_s = syllables_per_s
        self.frame_s = frame_s
        self.silence_floor = silence_floor
        self.silence_ratio = silence_ratio
        self.pause_frames = pause_frames
        self.hold_back = hold_back
        self._tail = ""  # text not yet cut into words
        self._first = True  # no word cut yet: leading whitespace joins the first word
        self._text_done = False
        self._audio_done = False
        self._pending: list[_Word] = []  # complete words not yet released
        self._released: list[WordTiming] = []
        self._frames = 0
        self._energy: bool | None = None  # fixed by the first push_frames call
        self._voiced: list[int] = []  # indices of voiced frames (energy mode)
        self._silent_run = 0
        self._peak = 0.0
        self._x_end = 0.0  # voiced-clock end of the last released word
        self._pause = 0.0  # nominal pause after the last released word
        self._scale = 1.0  # voiced seconds per nominal second: 1 until a pause measures it
        self._x_anchor = 0.0  # voiced time of the last pause the layout was re-synced to
        self._n_done = 0.0  # nominal seconds of the released words (gaps included)

    # ---- input ---------------------------------------------------------------------------------

    def push_text(self, delta: str) -> None:
        """Add a text delta of the turn (the same deltas the engine tokenizes)."""
        if not isinstance(delta, str):
            raise TypeError(f"text delta must be str, got {type(delta).__name__}")
        if self._text_done:
            raise ValueError("push_text after end_text")
        self._tail += delta
        self._cut_words(final=False)

    def end_text(self) -> None:
        """The turn's text is complete: its last word becomes final."""
        if not self._text_done:
            self._text_done = True
            self._cut_words(final=True)

    def push_frames(self, n: int = 1, rms: Sequence[float] | None = None) -> list[WordTiming]:
        """Account for `n` emitted audio frames (with their RMS energy, if known); return the
        words newly released."""
        if n < 0 or (rms is not None and len(rms) != n):
            raise ValueError(f"need n >= 0 frames and one rms value per frame, got {n}, {rms}")
        if self._audio_done:
            raise ValueError("push_frames after end_audio")
        if n == 0:
            return []
        energy = rms is not None
        if self._energy is None:
            self._energy = energy
        elif self._energy != energy:
            raise ValueError("give rms for every push_frames call of a turn, or for none")
        if not energy:
            self._frames += n
            return self._release(self._voiced_s())
        out: list[WordTiming] = []
        for value in rms or ():
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"rms must be finite and >= 0, got {value}")
            self._peak = max(self._peak, value)
            voiced = value >= max(self.silence_floor, self.silence_ratio * self._peak)
            if voiced and self._silent_run >= self.pause_frames and self._voiced:
                out += self._resync(self._voiced_s(), self._silent_run * self.frame_s)
            self._silent_run = 0 if voiced else self._silent_run + 1
            if voiced:
                self._voiced.append(self._frames)
            self._frames += 1
            out += self._release(self._voiced_s())
        return out

    def end_audio(self) -> list[WordTiming]:
        """The turn's audio is complete (EOS or frame cap): release every remaining word, scaled
        into the remaining voiced audio."""
        if self._audio_done:
            return []
        self.end_text()
        self._audio_done = True
        return self._fit(len(self._pending), max(self._voiced_s(), self._x_end))

    # ---- output --------------------------------------------------------------------------------

    @property
    def words(self) -> list[WordTiming]:
        """All words released so far, in order."""
        return list(self._released)

    @property
    def audio_s(self) -> float:
        """Audio emitted so far, in seconds."""
        return self._frames * self.frame_s

    @property
    def measured_syllables_per_s(self) -> float | None:
        """The voice's speaking rate over this turn (after `end_audio`, energy mode only): the
        prior for the conversation's next turn."""
        voiced = self._voiced_s()
        if not (self._audio_done and self._energy) or voiced <= 0:
            return None
        rate = sum(syllables(w.word) for w in self._released) / voiced
        return rate if rate > 0 else None

    def heard_text(self, played_s: float) -> str:
        """The text estimated as heard after `played_s` seconds of playback: every word whose
        estimated midpoint was played (for truncating the turn after an interruption)."""
        heard = [w.word for w in self._released if (w.start_s + w.end_s) / 2 <= played_s]
        if len(heard) < len(self._released):
            return "".join(heard)
        tail = self._tail
        words = self._pending + ([self._make_word(tail)] if tail else [])
        for word, start_s, end_s, _ in self._layout(words):
            if (start_s + end_s) / 2 > played_s:
                break
            heard.append(word.text)
        return "".join(heard)

    # ---- internals -----------------------------------------------------------------------------

    def _cut_words(self, final: bool) -> None:
        text, pos = self._tail, 0
        while pos < len(text):
            m = _WORD.match(text, _SPACE.match(text, pos).end() if self._first else pos)
            if m is None:  # only whitespace left (a whitespace-only text)
                if not final:
                    break
                end = len(text)
            elif m.end() < len(text) or final:
                end = m.end()
            else:
                break
            self._pending.append(self._make_word(text[pos:end]))
            pos, self._first = end, False
        self._tail = text[pos:]

    def _make_word(self, text: str) -> _Word:
        core = text.rstrip()
        pause = 0.35 if core.endswith(_SENTENCE) or "\n" in text[len(core) :] else 0.0
        pause = pause or (0.15 if core.endswith(_CLAUSE) else 0.0)
        return _Word(text, syllables(text) / self.syllables_per_s, pause)

    def _gap(self, pause: float) -> float:
        """Nominal pause between words: with energy, pauses come from the silent frames."""
        return 0.0 if self._energy else pause

    def _voiced_s(self) -> float:
        return (len(self._voiced) if self._energy else self._frames) * self.frame_s

    def _layout(self, words: list[_Word]) -> Iterator[tuple[_Word, float, float, float]]:
        """(word, start_s, end_s, voiced-clock end) of unreleased words after the released ones;
        lazy, so the per-frame release check costs O(words released), not O(text pending)."""
        x, pause = self._x_end, self._pause
        last = self._released[-1].end_s if self._released else 0.0
        for word in words:
            x += self._scale * self._gap(pause)
            x_end = x + self._scale * word.dur
            start = max(self._time_at(x, start=True), last)
            end = max(self._time_at(x_end, start=False), start) if word.dur > 0 else start
            yield word, start, end, x_end
            x, pause, last = x_end, word.pause, end

    def _release(self, voiced_s: float, limit: int | None = None) -> list[WordTiming]:
        """Release pending words whose voiced end is within `voiced_s` (all of the first `limit`
        when given)."""
        out: list[WordTiming] = []
        for i, (word, start, end, x_end) in enumerate(self._layout(self._pending)):
            if limit is not None and i >= limit:
                break
            if (
                limit is None
                and x_end + self.hold_back * (x_end - self._x_anchor) > voiced_s + 1e-9
            ):
                break  # held back until the audio is past it even if speech is slower
            end = min(end, self.audio_s)
            timing = WordTiming(word.text, min(start, end), end)
            assert not self._released or timing.start_s >= self._released[-1].end_s - 1e-9, (
                f"word timings went backwards: {timing} after {self._released[-1]}"
            )
            self._released.append(timing)
            out.append(timing)
        if out:
            last = self._pending[len(out) - 1]
            nominal = self._nominal(len(out))
            self._n_done += nominal
            self._x_end = min(self._x_end + nominal * self._scale, voiced_s)
            self._pause = last.pause
            del self._pending[: len(out)]
        return out

    def _nominal(self, count: int) -> float:
        """Nominal seconds from the last released word's end to the end of pending word count-1."""
        words = self._pending[:count]
        gaps = [self._pause] + [w.pause for w in words[:-1]]
        return sum(w.dur for w in words) + sum(self._gap(p) for p in gaps[: len(words)])

    def _fit(self, count: int, x_target: float) -> list[WordTiming]:
        """Release the first `count` pending words stretched to end exactly at voiced `x_target`."""
        nominal = self._nominal(count)
        saved, room = self._scale, max(x_target - self._x_end, 0.0)
        self._scale = room / nominal if nominal > 0 else 0.0
        out = self._release(x_target, limit=count)
        self._scale, self._x_end = saved, x_target
        return out

    def _resync(self, x_pause: float, pause_s: float) -> list[WordTiming]:
        """A pause of `pause_s` just ended at voiced time `x_pause`: move the nearest word
        boundary (punctuation preferred) onto it, so rate errors do not accumulate."""
        window = max(0.5, 0.35 * (x_pause - self._x_anchor))  # drift grows with distance
        best: tuple[float, int] | None = None
        if x_pause - self._x_end <= window:
            best = ((x_pause - self._x_end) / window - _affinity(self._pause, pause_s), 0)
        x = self._x_end + self._scale * self._gap(self._pause)
        for i, word in enumerate(self._pending):
            x_end = x + self._scale * word.dur
            if x_end - x_pause > window:
                break
            cost = abs(x_end - x_pause) / window - _affinity(word.pause, pause_s)
            if abs(x_end - x_pause) <= window and (best is None or cost < best[0]):
                best = (cost, i + 1)
            x = x_end + self._scale * self._gap(word.pause)
        if best is None:
            return []
        out = self._fit(best[1], x_pause) if best[1] else []
        self._x_end = self._x_anchor = x_pause  # the next word starts after the pause
        # measured rate so far, shrunk towards the prior while little speech has been heard
        scale = (x_pause + _PRIOR_S) / (self._n_done + _PRIOR_S)
        self._scale = min(max(scale, 0.5), 2.0)
        return out

    def _time_at(self, x: float, *, start: bool) -> float:
        """Audio time at which the voiced clock reads `x`; at a frame boundary a start maps to the
        next voiced frame (after a pause), an end to the previous one (before it)."""
        if not self._energy:
            return x
        k = x / self.frame_s
        q = math.floor(k + 1e-9)
        r = max(k - q, 0.0)
        if r < 1e-9 and not start and q > 0:
            return self._frame_start(q - 1) + self.frame_s
        return self._frame_start(q) + r * self.frame_s

    def _frame_start(self, q: int) -> float:
        voiced = self._voiced
        if q < len(voiced):
            return voiced[q] * self.frame_s
        return (self._frames + q - len(voiced)) * self.frame_s  # beyond the audio: extrapolate
