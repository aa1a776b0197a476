"""PCM helpers: read any audio source to float32 mono, resample, float <-> int16.

Sources are a path, encoded bytes (wav/flac/ogg/mp3 through libsndfile), headerless 16-bit PCM
bytes (when `sample_rate` is given: what voice frameworks hand over), or an array. Every bad input
raises `InvalidAudioError` saying what was wrong, because these come from users and frameworks.
"""

from __future__ import annotations

import io
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from core.errors import InvalidAudioError

AudioSource = str | Path | bytes | bytearray | memoryview | np.ndarray
_MAX_CHANNELS = 8
# Reference (voice prompt) audio policy; `core.voices` documents why each limit is what it is.
REFERENCE_MIN_SECONDS = 1.0
REFERENCE_MAX_SECONDS = 30.0
REFERENCE_SILENCE_PEAK = 1e-3  # -60 dBFS
REFERENCE_CLIP_FRACTION = 0.01


def read_audio(source: AudioSource, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Return (float32 mono in [-1, 1] scale, sample rate) for a path, bytes or array.

    Args:
        source: a file path; encoded bytes; raw little-endian int16 mono bytes (needs
            `sample_rate`); or an array (float in [-1, 1], or int16/int32 PCM) shaped [T],
            [T, C] or [C, T] with at most 8 channels (the smaller axis is the channel axis).
        sample_rate: the rate of a raw array or raw bytes; for encoded audio it must match the
            header if given.
    """
    if sample_rate is not None and (
        isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0
    ):
        raise InvalidAudioError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if hasattr(source, "detach") and hasattr(source, "numpy"):  # a torch tensor
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise InvalidAudioError("a raw audio array needs its sample_rate")
        return _finite(_downmix(_to_float(source))), sample_rate
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if not path.is_file():
            raise InvalidAudioError(f"audio file not found: {path}")
        data, rate = _decode(path, str(path))
    elif isinstance(source, bytes | bytearray | memoryview):
        raw = bytes(source)
        try:
            data, rate = _decode(io.BytesIO(raw), "audio bytes")
        except InvalidAudioError:
            if sample_rate is None:
                raise
            return _finite(int16_to_float(raw)), sample_rate  # headerless PCM from a framework
    else:
        raise InvalidAudioError(f"unsupported audio source type {type(source).__name__}")
    if sample_rate is not None and sample_rate != rate:
        raise InvalidAudioError(f"sample_rate={sample_rate} given, but the audio is {rate} Hz")
    return _finite(_downmix(data)), rate


def check_reference_audio(
    audio: np.ndarray,
    rate: int,
    *,
    min_seconds: float = REFERENCE_MIN_SECONDS,
    max_seconds: float = REFERENCE_MAX_SECONDS,
    silence_peak: float = REFERENCE_SILENCE_PEAK,
    clip_fraction: float = REFERENCE_CLIP_FRACTION,
) -> None:
    """Raise `InvalidAudioError` if `read_audio`'s output cannot serve as a voice prompt.

    Pure (no codec, no torch), so the CLI rejects a bad `--voice` in a second, before a model load
    that takes minutes, with the same rules the engine applies (see `core.voices`).
    """
    seconds = audio.shape[0] / rate
    if seconds < min_seconds:
        raise InvalidAudioError(f"reference audio is too short: {seconds:.2f} s < {min_seconds:g} s")
    if seconds > max_seconds:
        raise InvalidAudioError(
            f"reference audio is too long: {seconds:.1f} s > {max_seconds:g} s; "
            "trim it to the excerpt you want (it is not cut automatically)"
        )
    peak = float(np.abs(audio).max())
    if peak < silence_peak:
        raise InvalidAudioError(f"reference audio is silent (peak {peak:.2e})")
    clipped = float(np.mean(np.abs(audio) >= 0.99))
    if clipped > clip_fraction:
        raise InvalidAudioError(f"reference audio is clipped: {clipped:.1%} of samples at full scale")


def _decode(file: Path | io.BytesIO, what: str) -> tuple[np.ndarray, int]:
    try:
        data, rate = sf.read(file, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidAudioError(f"cannot decode {what} (wav/flac/ogg/mp3 expected): {exc}") from exc
    return data, int(rate)


def _to_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if a.dtype == np.int32:
        return (a.astype(np.float64) / 2147483648.0).astype(np.float32)
    if a.dtype in (np.float32, np.float64, np.float16):
        return a.astype(np.float32, copy=False)
    raise InvalidAudioError(f"audio arrays must be float or int16/int32 PCM, got dtype {a.dtype}")


def _downmix(a: np.ndarray) -> np.ndarray:
    """[T] stays; [T, C] or [C, T] (C <= 8, the smaller axis) is averaged to mono."""
    if a.ndim == 1:
        return np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 2:
        raise InvalidAudioError(f"audio must be 1-D or 2-D, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, np.float32)
    axis = 1 if a.shape[1] <= a.shape[0] else 0
    if a.shape[axis] > _MAX_CHANNELS or a.shape[axis] == 0:
        raise InvalidAudioError(f"cannot tell channels from time in shape {a.shape}")
    return np.ascontiguousarray(a.mean(axis=axis, dtype=np.float32))


def _finite(a: np.ndarray) -> np.ndarray:
    if not np.isfinite(a).all():
        raise InvalidAudioError("audio contains NaN or infinite samples")
    return a


def resample(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Polyphase resampling (scipy's anti-aliased FIR) of a 1-D signal; float32 out."""
    if min(sr_from, sr_to) <= 0:
        raise InvalidAudioError(f"sample rates must be positive, got {sr_from} -> {sr_to}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise InvalidAudioError(f"resample expects 1-D audio, got shape {x.shape}")
    if sr_from == sr_to or x.size == 0:
        return x.copy() if sr_from == sr_to else np.zeros(0, np.float32)
    g = gcd(sr_from, sr_to)
    return resample_poly(x, sr_to // g, sr_from // g).astype(np.float32)


def float_to_int16(x: np.ndarray) -> np.ndarray:
    """Float in [-1, 1] -> int16 PCM, clipped (random or hot audio must not wrap around)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidAudioError(f"float_to_int16 expects float samples, got {x.dtype}")
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def int16_to_float(x: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    """int16 PCM (array or little-endian bytes) -> float32 in [-1, 1)."""
    if isinstance(x, bytes | bytearray | memoryview):
        if len(x) % 2:
            raise InvalidAudioError(f"16-bit PCM bytes must have even length, got {len(x)}")
        x = np.frombuffer(bytes(x), dtype="<i2")
    x = np.asarray(x)
    if x.dtype != np.int16:
        raise InvalidAudioError(f"int16_to_float expects int16 samples, got {x.dtype}")
    return x.astype(np.float32) / 32768.0
