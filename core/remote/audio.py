"""Audio as the wire carries it: user speech as int16 mono PCM (at most 24 kHz, the codec's
rate, so 60 s stays under a message's size limit) and voice uploads as file bytes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from core.audio import float_to_int16, read_audio, resample
from core.wire import SAMPLE_RATE


def user_pcm(audio: Any, sample_rate: int | None, max_s: float) -> tuple[bytes, int]:
    """(int16 mono little-endian PCM, rate) for user speech already checked by `inspect_audio`.

    int16 mono input at <= 24 kHz goes as it is (exactly what an in-process engine would read);
    anything else is read (and above 24 kHz resampled, which the engine does anyway) first.
    """
    if (isinstance(audio, bytes | bytearray | memoryview) and sample_rate is not None
            and sample_rate <= SAMPLE_RATE):
        return bytes(audio), sample_rate
    if isinstance(audio, np.ndarray) and audio.dtype == np.int16 and audio.ndim == 1 and (
            sample_rate is not None and sample_rate <= SAMPLE_RATE):
        return audio.astype("<i2").tobytes(), sample_rate
    x, rate = read_audio(audio, sample_rate, name="audio", max_seconds=max_s,
                         limit="max_user_audio_s")
    if rate > SAMPLE_RATE:
        x, rate = resample(x, rate, SAMPLE_RATE), SAMPLE_RATE
    return float_to_int16(x).astype("<i2").tobytes(), rate


def voice_body(source: Any, sample_rate: int | None) -> tuple[bytes, int | None]:
    """(body, sample_rate query) of a voice upload: a file's bytes, bytes as given (encoded, or
    raw int16 PCM with a rate), an array as a float32 WAV (read exactly as the engine would)."""
    if isinstance(source, str | Path):
        return Path(source).expanduser().read_bytes(), sample_rate
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), sample_rate
    x, rate = read_audio(source, sample_rate, name="source")
    buf = io.BytesIO()
    soundfile.write(buf, x.astype(np.float32), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue(), None
