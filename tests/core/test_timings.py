"""Word timings estimated from the audio: the guarantees plugins rely on, and their accuracy."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.timings import FRAME_S, WordTiming, WordTimingEstimator, syllables

PIECES = ["Hello", " there", ",", " this", " is", ".", " 你好", "，", "世界", "。", "!", " 42",
          " ", "  ", "\n", "don't", " e\u0301", "🎉", " -", " (ok)", "한국어", " мир"]  # fmt: skip
EN = (
    "Hello there, this is a parity test of the streaming model. It speaks while the language "
    "model is still writing, and it should sound natural. Could you tell me the weather?"
)
ZH = "你好，世界。今天天气很好，我们去公园散步吧。请问明天的天气怎么样？明天是晴天。"

op = st.one_of(
    st.tuples(st.just("text"), st.sampled_from(PIECES)),
    st.tuples(st.just("frames"), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("end_text")),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, max_size=40), energy=st.booleans(), seed=st.integers(0, 99))
def test_released_timings_are_final_monotonic_and_behind_the_audio(
    ops: list[tuple], energy: bool, seed: int
) -> None:
    """Plugins forward timings as they come (LiveKit transcription sync, Pipecat word frames):
    a timing that is revised, goes backwards, runs ahead of the audio or loses text would show
    wrong captions."""
    rnd = random.Random(seed)
    est = WordTimingEstimator()
    text, seen, text_done = "", [], False
    for kind, *args in ops:
        if kind == "text" and not text_done:
            est.push_text(args[0])
            text += args[0]
        elif kind == "end_text":
            est.end_text()
            text_done = True
        elif kind == "frames":
            n, silent = args
            rms = [0.0 if silent else rnd.uniform(0.02, 0.3) for _ in range(n)] if energy else None
            new = est.push_frames(n, rms)
            for w in new:
                assert w.end_s <= est.audio_s + 1e-9  # never ahead of the audio emitted
            seen += new
        assert est.words == seen  # cumulative, never revised
    seen += est.end_audio()
    assert est.words == seen
    assert "".join(w.word for w in seen) == text
    prev_end = 0.0
    for w in seen:
        assert prev_end - 1e-9 <= w.start_s <= w.end_s <= est.audio_s + 1e-9
        prev_end = w.end_s


def _words(text: str) -> list[str]:
    est = WordTimingEstimator()
    est.push_text(text)
    est.push_frames(10)
    est.end_audio()
    return [w.word for w in est.words]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("你好，世界。", ["你", "好，", "世", "界。"]),
        ("OK你好 world", ["OK", "你", "好 ", "world"]),
        ("  Hi, there!  ", ["  Hi, ", "there!  "]),
        ("カタカナ", ["カ", "タ", "カ", "ナ"]),
        ("한국어 단어", ["한국어 ", "단어"]),
        ("   ", ["   "]),
        ("", []),
    ],
)
def test_word_segmentation(text: str, words: list[str]) -> None:
    """Captions need whole words with their spaces and punctuation, and CJK per character."""
    assert _words(text) == words


def test_words_wait_for_their_text_to_be_complete() -> None:
    """A word released before the LLM finished it would be cut ("Hel" instead of "Hello")."""
    est = WordTimingEstimator()
    est.push_text("Hel")
    assert est.push_frames(50) == []
    est.push_text("lo ")
    assert est.push_frames(1) == []  # "Hello " may still grow whitespace
    est.push_text("w")
    assert [w.word for w in est.push_frames(1)] == ["Hello "]


def test_words_are_not_released_before_their_audio() -> None:
    """Timings ahead of the audio would show captions before the words are heard."""
    est = WordTimingEstimator(syllables_per_s=4.0)
    est.push_text("one two three four five six")
    est.end_text()
    released = est.push_frames(3)  # 0.24 s: not even "one" (0.25 s nominal) is complete
    assert released == []
    released = est.push_frames(10)
    assert released and all(w.end_s <= est.audio_s for w in released)
    assert len(released) < 6


def _speak(text: str, rate: float, seed: int) -> tuple[WordTimingEstimator, list, list]:
    """Synthetic speech: per-word durations at `rate` +-20%, pauses at punctuation, 0.2 s of
    leading and 0.3 s of trailing silence; returns (estimator, estimated, true word spans)."""
    rnd = random.Random(seed)
    est = WordTimingEstimator()
    est.push_text(text)
    est.end_text()
    truth, t = [], 0.2
    for word in _words(text):
        d = syllables(word) / rate * rnd.uniform(0.8, 1.2)
        truth.append((t, t + d))
        t += d
        core = word.rstrip()
        if core.endswith((".", "?", "!", "。", "？")):
            t += 0.45 * rnd.uniform(0.7, 1.3)
        elif core.endswith((",", "，")):
            t += 0.2 * rnd.uniform(0.7, 1.3)
    out: list[WordTiming] = []
    for f in range(int((t + 0.3) / FRAME_S) + 1):
        a, b = f * FRAME_S, (f + 1) * FRAME_S
        speech = sum(max(0.0, min(b, e) - max(a, s)) for s, e in truth) / FRAME_S
        rms = rnd.uniform(0.05, 0.15) if speech > 0.5 else 5e-4
        out += est.push_frames(1, [rms])
    out += est.end_audio()
    return est, out, truth


@pytest.mark.parametrize("text", [EN, ZH])
@pytest.mark.parametrize("rate", [3.6, 4.5, 5.4])
def test_accuracy_on_synthetic_speech(text: str, rate: float) -> None:
    """Interruption keeps the words estimated as heard: large timing errors would keep unheard
    words in the context (or drop heard ones). The default rate is 4.5; +-20% must still work."""
    errors = []
    for seed in range(3):
        _, est, truth = _speak(text, rate, seed)
        errors += [abs(e.start_s - s) for e, (s, _) in zip(est, truth, strict=True)]
    assert statistics.mean(errors) < 0.15
    assert max(errors) < 0.7


def test_measured_rate_is_the_next_turns_prior() -> None:
    """A conversation re-uses the voice's measured rate; a wrong measurement would skew every
    later turn."""
    for rate in (3.6, 5.4):
        est, _, _ = _speak(EN, rate, 0)
        assert est.measured_syllables_per_s == pytest.approx(rate, rel=0.1)
    probe = WordTimingEstimator()
    probe.push_text(EN)
    probe.push_frames(20, [0.1] * 20)
    assert probe.measured_syllables_per_s is None  # not before end_audio
    no_energy = WordTimingEstimator()
    no_energy.push_text("hi")
    no_energy.push_frames(5)
    no_energy.end_audio()
    assert no_energy.measured_syllables_per_s is None


def test_pause_separates_words() -> None:
    """A silence inside speech belongs between words: a caption must not straddle the pause."""
    est = WordTimingEstimator()
    est.push_text("Hello there, friend of mine.")
    est.end_text()
    loud, quiet = [0.1] * 6, [0.0] * 5
    words = est.push_frames(16, loud + quiet + loud[:5]) + est.end_audio()
    there = next(w for w in words if w.word == "there, ")
    friend = next(w for w in words if w.word == "friend ")
    assert there.end_s <= 6 * FRAME_S + 1e-9
    assert friend.start_s >= 11 * FRAME_S - 1e-9


def test_heard_text() -> None:
    """After an interruption the context keeps exactly the words heard: none when nothing was
    played, all when everything was, and a growing prefix in between, mid-turn too."""
    est = WordTimingEstimator()
    est.push_text(EN)
    est.push_frames(30, [0.1] * 30)
    mid = [est.heard_text(t / 10) for t in range(0, 60)]
    assert mid[0] == ""
    for a, b in zip(mid, mid[1:], strict=False):
        assert b.startswith(a)
    assert EN.startswith(mid[-1]) and mid[-1] != EN
    est.end_audio()
    assert est.heard_text(0.0) == ""
    assert est.heard_text(est.audio_s) == EN
    half = est.heard_text(est.audio_s / 2)
    assert 0 < len(half) < len(EN) and EN.startswith(half)
    words = est.words
    w = words[len(words) // 2]
    just_before = est.heard_text((w.start_s + w.end_s) / 2 - 1e-6)
    assert est.heard_text((w.start_s + w.end_s) / 2) == just_before + w.word


def test_bad_input() -> None:
    """Misuse must fail loudly at the call instead of producing silently wrong timings."""
    est = WordTimingEstimator()
    with pytest.raises(TypeError):
        est.push_text(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one rms value per frame"):
        est.push_frames(2, [0.1])
    est.push_frames(1, [0.1])
    with pytest.raises(ValueError, match="every push_frames call"):
        est.push_frames(1)
    with pytest.raises(ValueError, match="finite"):
        est.push_frames(1, [float("nan")])
    est.end_text()
    with pytest.raises(ValueError, match="after end_text"):
        est.push_text("more")
    est.end_audio()
    with pytest.raises(ValueError, match="after end_audio"):
        est.push_frames(1, [0.1])
    with pytest.raises(ValueError):
        WordTimingEstimator(syllables_per_s=0)
