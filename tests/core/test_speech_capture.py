"""`core.speech_capture`: the audio rules both plugins record the user's speech with."""

from __future__ import annotations

import numpy as np
import pytest

from core.speech_capture import MAX_SPEECH_S, PRE_ROLL_S, SpeechCapture, to_mono

RATE = 16000
FRAME = 160  # 10 ms


def _frame(value: int, n: int = FRAME, channels: int = 1) -> bytes:
    return np.full(n * channels, value, dtype=np.int16).tobytes()


def _feed(capture: SpeechCapture, values: range | list[int], rate: int = RATE) -> None:
    for v in values:
        capture.feed(_frame(v, n=rate // 100), rate)


def _frames(speech: tuple[np.ndarray, int] | None) -> list[int]:
    """The frame values taken, one per 10 ms frame (each frame holds one value)."""
    assert speech is not None
    pcm, rate = speech
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    return pcm.reshape(-1, rate // 100)[:, 0].tolist()


def test_defaults_are_the_plugins_rules() -> None:
    assert PRE_ROLL_S == 0.3 and MAX_SPEECH_S == 30.0


def test_pre_roll_is_kept_and_nothing_older() -> None:
    """Prevents: the first syllables lost (the VAD fires late), or all the silence before the
    turn given with it."""
    capture = SpeechCapture(pre_roll_s=0.05)
    _feed(capture, range(1, 21))  # 0.2 s before speech
    assert capture.start() == 1 and capture.speaking
    _feed(capture, range(21, 31))
    capture.stop()
    _feed(capture, range(31, 41))  # after speech: pre-roll of a later turn, not this one
    assert _frames(capture.take()) == list(range(16, 31))  # the last 5 frames, then speech
    assert capture.take() is None


def test_no_pre_roll_and_nothing_before_speech() -> None:
    capture = SpeechCapture(pre_roll_s=0.0)
    _feed(capture, range(1, 11))
    assert capture.take() is None  # audio outside speech is never taken
    capture.start()
    _feed(capture, [11])
    capture.stop()
    assert _frames(capture.take()) == [11]


def test_nothing_heard_is_none() -> None:
    capture = SpeechCapture()
    assert capture.take() is None
    capture.start()
    capture.feed(b"", RATE)  # an empty frame holds nothing
    capture.stop()
    assert capture.take() is None


def test_cap_keep_first_drops_what_no_longer_fits() -> None:
    capture = SpeechCapture(pre_roll_s=0.02, max_s=0.1, keep="first")
    _feed(capture, [1, 2, 3])
    capture.start()
    _feed(capture, range(4, 20))
    assert _frames(capture.take()) == list(range(2, 12))  # 2 pre-roll frames + 8 of speech


def test_cap_keep_last_drops_the_oldest() -> None:
    capture = SpeechCapture(pre_roll_s=0.02, max_s=0.1, keep="last")
    _feed(capture, [1, 2, 3])
    capture.start()
    _feed(capture, range(4, 20))
    assert _frames(capture.take()) == list(range(10, 20))


def test_cap_keep_last_never_drops_the_newest_chunk() -> None:
    capture = SpeechCapture(pre_roll_s=0.0, max_s=0.005, keep="last")
    capture.start()
    _feed(capture, [1, 2])  # each frame alone is longer than the cap
    assert _frames(capture.take()) == [2]


def test_cap_counts_all_stretches_until_taken() -> None:
    capture = SpeechCapture(pre_roll_s=0.0, max_s=0.1, keep="last")
    capture.start()
    _feed(capture, range(1, 7))
    capture.stop()
    capture.start()
    _feed(capture, range(7, 13))
    assert _frames(capture.take()) == list(range(3, 13))


def test_stereo_is_averaged_to_mono() -> None:
    stereo = np.array([[100, 301], [-100, -301], [32767, 32767], [-32768, -32767]], np.int16)
    assert to_mono(stereo.tobytes(), 2).tolist() == [200, -200, 32767, -32767]
    capture = SpeechCapture(pre_roll_s=0.0)
    capture.start()
    capture.feed(stereo.tobytes(), 48000, channels=2)
    pcm, rate = capture.take()
    assert rate == 48000 and pcm.tolist() == [200, -200, 32767, -32767]


def test_mono_is_copied_from_the_frame_buffer() -> None:
    """Frameworks reuse frame buffers: what is held must not change with them."""
    buffer = bytearray(_frame(7))
    capture = SpeechCapture(pre_roll_s=0.0)
    capture.start()
    capture.feed(memoryview(buffer), RATE)
    buffer[:] = bytes(len(buffer))
    assert set(capture.take()[0].tolist()) == {7}


def test_rate_is_kept_and_a_rate_change_keeps_the_newest_rate() -> None:
    """Nothing is resampled here (the engine does, when it encodes); one take is one rate."""
    capture = SpeechCapture(pre_roll_s=0.0)
    capture.start()
    _feed(capture, [1, 2], rate=48000)
    assert capture.take()[1] == 48000
    _feed(capture, [3, 4], rate=48000)
    _feed(capture, [5, 6], rate=8000)  # the input's rate changed mid-turn
    speech = capture.take()
    assert speech[1] == 8000 and _frames(speech) == [5, 6]


def test_take_and_drop_by_stretch() -> None:
    """A stretch still going on keeps recording after its audio is taken; others can be left
    for later or dropped."""
    capture = SpeechCapture(pre_roll_s=0.0)
    first = capture.start()
    _feed(capture, [1, 2])
    capture.stop()
    second = capture.start()
    _feed(capture, [3])
    assert second == first + 1
    assert _frames(capture.take({second})) == [3]
    _feed(capture, [4])
    capture.drop({first})
    assert _frames(capture.take()) == [4]


def test_bad_settings_are_refused() -> None:
    for kwargs in ({"pre_roll_s": -0.1}, {"max_s": 0}, {"keep": "middle"}):
        with pytest.raises(ValueError):
            SpeechCapture(**kwargs)
