"""PCM helpers: read any audio source to float32 mono, resample, float <-> int16.

Sources are a path, encoded bytes (wav/flac/ogg/mp3 through libsndfile), headerless 16-bit PCM
bytes (when `sample_rate` is given: what voice frameworks hand over), or an array: numpy, or a
torch tensor (floating tensors of any dtype, bfloat16 included, are read as float32). Every bad
input raises `InvalidAudioError` naming the argument, because these come from users and
frameworks.

Bounds, checked by `inspect_audio` from the arguments, an array's shape or a file's header before
anything is decoded, converted or resampled (so a hostile input costs a header read at most):

- sample rate: an integer in 8,000..192,000 Hz (`MIN_SAMPLE_RATE`..`MAX_SAMPLE_RATE`), declared
  by the caller or claimed by a header. 8 kHz is telephony (G.711, the phone bots), the lowest
  rate a transport sends; WebRTC and LiveKit send 48 kHz; 192 kHz is the highest rate studio files
  use. The resampler's filter grows with the rate, so an unbounded rate was an unbounded
  allocation (10**12 Hz asked for 18.6 GiB);
- channels: at most 8;
- duration: at most `max_seconds` when given (the engine gives 30 s for voices and
  `EngineConfig.max_user_audio_s` for user audio); decoding also stops there, whatever the
  header claimed;
- encoded size: bytes or a file larger than `max_seconds` of the widest accepted audio (8
  channels of 32-bit samples at 192 kHz, plus 1 MiB for headers and tags) are refused unread.
"""

from __future__ import annotations

import io
import math
import numbers
import reprlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from core.errors import InvalidAudioError

AudioSource = str | Path | bytes | bytearray | memoryview | np.ndarray  # or a torch tensor
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
_MAX_CHANNELS = 8
_MAX_BYTES_PER_SECOND = MAX_SAMPLE_RATE * _MAX_CHANNELS * 4
_HEADER_SLACK = 2**20
# The resampling filter has 20 * max(up, down) taps; every standard rate to 24 kHz needs <= 320.
_MAX_RESAMPLE_FACTOR = 1024
# Reference (voice prompt) audio policy; `core.voices` documents why each limit is what it is.
REFERENCE_MIN_SECONDS = 1.0
REFERENCE_MAX_SECONDS = 30.0
REFERENCE_SILENCE_PEAK = 1e-3  # -60 dBFS
REFERENCE_CLIP_FRACTION = 0.01


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """What a source holds, known without decoding it."""

    kind: str  # "array" (numpy or torch), "file", "encoded" (bytes with a header) or "pcm16"
    rate: int
    frames: int
    channels: int


class _Undecodable(InvalidAudioError):
    """libsndfile cannot parse the bytes (they may still be headerless PCM)."""


def check_sample_rate(rate: object, what: str = "sample_rate") -> int:
    """`rate` as an int when it is an integer in the accepted range; else `InvalidAudioError`."""
    if (
        isinstance(rate, bool)
        or not isinstance(rate, numbers.Integral)
        or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE
    ):
        raise InvalidAudioError(
            f"{what} must be an integer in {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, "
            f"got {reprlib.repr(rate)}"
        )
    return int(rate)


def inspect_audio(
    source: Any,
    sample_rate: Any = None,
    *,
    name: str = "audio",
    max_seconds: float | None = None,
    limit: str = "max_seconds",
) -> AudioInfo:
    """Check everything about `source` that needs no decoding, and say what it holds.

    Costs at most a header read, so callers run it before queueing any work.

    Raises:
        InvalidAudioError: naming `sample_rate`, `name` or `limit`: a rate outside
            8..192 kHz, an unusable type, dtype or shape, more than 8 channels, more than
            `max_seconds`, or more bytes than `max_seconds` of audio can take.
    """
    rate = None if sample_rate is None else check_sample_rate(sample_rate)
    if max_seconds is not None:
        _check_size(source, name, max_seconds, limit)
    info = _probe(source, rate, name)
    if info.channels > _MAX_CHANNELS:
        raise InvalidAudioError(f"{name} has {info.channels} channels, at most {_MAX_CHANNELS}")
    _check_length(info.frames, info.rate, name, max_seconds, limit)
    return info


def read_audio(
    source: Any,
    sample_rate: Any = None,
    *,
    name: str = "audio",
    max_seconds: float | None = None,
    limit: str = "max_seconds",
) -> tuple[np.ndarray, int]:
    """Return (float32 mono in [-1, 1] scale, sample rate) for a path, bytes or array.

    Args:
        source: a file path; encoded bytes; raw little-endian int16 mono bytes (needs
            `sample_rate`); or an array or tensor (float in [-1, 1], or int16/int32 PCM) shaped
            [T], [T, C] or [C, T] with at most 8 channels (the smaller axis is the channel axis).
        sample_rate: the rate of a raw array or raw bytes; for encoded audio it must match the
            header if given.
        name: the caller's argument, named in every error.
        max_seconds: longest audio accepted (None: no limit), named `limit` in the error.
    """
    info = inspect_audio(source, sample_rate, name=name, max_seconds=max_seconds, limit=limit)
    if info.kind == "array":
        data = _downmix(_to_float(to_numpy(source, name)))
    elif info.kind == "pcm16":
        data = int16_to_float(source)
    else:
        file = _existing_file(source, name) if info.kind == "file" else _bytes_file(source)
        data = _decode(file, info, name, max_seconds, limit)
    return _finite(data, name), info.rate


def to_numpy(source: Any, name: str = "audio") -> np.ndarray:
    """A numpy array as is; a tensor as a CPU array, floating dtypes as float32 (numpy has no
    bfloat16, and float32 is what the caller means by audio)."""
    if isinstance(source, np.ndarray):
        return source
    try:
        tensor = source.detach().cpu()
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    except (AttributeError, RuntimeError, TypeError, NotImplementedError) as exc:
        raise InvalidAudioError(f"{name}: cannot read this tensor ({exc})") from exc


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


def _check_size(source: Any, name: str, max_seconds: float, limit: str) -> None:
    """Bytes or a file larger than `max_seconds` of the widest audio can be: refused unread
    (they would be copied, hashed and parsed whole before their length is known)."""
    if isinstance(source, bytes | bytearray | memoryview):
        size = memoryview(source).nbytes
    elif isinstance(source, str | Path):
        size = _existing_file(source, name).stat().st_size
    else:
        return
    most = math.ceil(max_seconds * _MAX_BYTES_PER_SECOND) + _HEADER_SLACK
    if size > most:
        raise InvalidAudioError(f"{name} is too large: {size} bytes, more than {limit}="
                                f"{max_seconds:g} s of audio can take ({most} bytes)")


def _check_length(
    frames: int, rate: int, name: str, max_seconds: float | None, limit: str
) -> None:
    if max_seconds is not None and frames > max_seconds * rate:
        raise InvalidAudioError(
            f"{name} is too long: {frames / rate:.1f} s > {limit}={max_seconds:g} s"
        )


def _probe(source: Any, rate: int | None, name: str) -> AudioInfo:
    """The one type dispatch: what `source` holds, from its shape or header."""
    if isinstance(source, np.ndarray) or _is_tensor(source):
        if rate is None:
            raise InvalidAudioError(f"{name}: a raw audio array needs its sample_rate")
        _check_dtype(source, name)
        frames, channels = _layout(tuple(int(n) for n in source.shape), name)
        return AudioInfo("array", rate, frames, channels)
    if isinstance(source, str | Path):
        return _probe_header(_existing_file(source, name), rate, name)
    if isinstance(source, bytes | bytearray | memoryview):
        try:
            return _probe_header(_bytes_file(source), rate, name)
        except _Undecodable:
            if rate is None:
                raise
        nbytes = memoryview(source).nbytes  # headerless PCM from a framework
        if nbytes % 2:
            raise InvalidAudioError(f"{name}: 16-bit PCM bytes must have even length, got {nbytes}")
        return AudioInfo("pcm16", rate, nbytes // 2, 1)
    raise InvalidAudioError(f"{name}: unsupported audio source type {type(source).__name__}")


def _probe_header(file: Path | io.BytesIO, rate: int | None, name: str) -> AudioInfo:
    what = str(file) if isinstance(file, Path) else "audio bytes"
    try:
        info = sf.info(file)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise _Undecodable(
            f"{name}: cannot decode {what} (wav/flac/ogg/mp3 expected): {exc}"
        ) from exc
    header_rate = check_sample_rate(info.samplerate, f"the sample_rate in the header of {name}")
    if rate is not None and rate != header_rate:
        raise InvalidAudioError(f"sample_rate={rate} given, but {name} is {header_rate} Hz")
    kind = "file" if isinstance(file, Path) else "encoded"
    return AudioInfo(kind, header_rate, max(0, int(info.frames)), int(info.channels))


def _bytes_file(source: bytes | bytearray | memoryview) -> io.BytesIO:
    if isinstance(source, memoryview) and not source.c_contiguous:
        source = source.tobytes()  # BytesIO takes C-contiguous buffers only
    return io.BytesIO(source)


def _existing_file(source: str | Path, name: str) -> Path:
    try:
        path = Path(source).expanduser()
        if path.is_file():
            return path
    except (OSError, RuntimeError, ValueError) as exc:  # name too long, NUL byte, unknown ~user
        raise InvalidAudioError(
            f"{name}: unusable file path {reprlib.repr(str(source))}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from exc
    raise InvalidAudioError(f"{name}: audio file not found: {path}")


def _is_tensor(x: object) -> bool:
    return hasattr(x, "detach") and hasattr(x, "is_floating_point") and hasattr(x, "shape")


def _check_dtype(a: Any, name: str) -> None:
    """Float of any width, int16 or int32 PCM; complex, bool, object, other ints are refused."""
    if isinstance(a, np.ndarray):
        ok = a.dtype.kind == "f" or (a.dtype.kind == "i" and a.dtype.itemsize in (2, 4))
    else:
        ok = bool(a.is_floating_point()) or str(a.dtype) in ("torch.int16", "torch.int32")
    if not ok:
        raise InvalidAudioError(
            f"{name} samples must be float or int16/int32 PCM, got dtype {a.dtype}"
        )


def _layout(shape: tuple[int, ...], name: str) -> tuple[int, int]:
    """(frames, channels): [T] is mono; in [T, C] or [C, T] the smaller axis (<= 8) is C."""
    if len(shape) == 1:
        return shape[0], 1
    if len(shape) != 2:
        raise InvalidAudioError(f"{name} must be 1-D or 2-D, got shape {shape}")
    if 0 in shape:
        return 0, 1
    if min(shape) > _MAX_CHANNELS:
        raise InvalidAudioError(f"{name}: cannot tell channels from time in shape {shape}")
    return max(shape), min(shape)


def _decode(
    file: Path | io.BytesIO, info: AudioInfo, name: str, max_seconds: float | None, limit: str
) -> np.ndarray:
    """Decode to mono, at most one frame past `max_seconds` whatever the header said."""
    cap = -1 if max_seconds is None else math.floor(max_seconds * info.rate) + 1
    try:
        data, rate = sf.read(file, frames=cap, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidAudioError(
            f"{name}: cannot decode it (wav/flac/ogg/mp3 expected): {exc}"
        ) from exc
    if rate != info.rate:
        raise InvalidAudioError(f"{name} changed while it was read ({info.rate} -> {rate} Hz)")
    _check_length(data.shape[0], rate, name, max_seconds, limit)
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(mono)


def _to_float(a: np.ndarray) -> np.ndarray:
    """Samples checked by `_check_dtype` -> float32 in [-1, 1] scale."""
    if a.dtype.kind == "i" and a.dtype.itemsize == 2:
        return a.astype(np.float32) / 32768.0
    if a.dtype.kind == "i":
        return (a.astype(np.float64) / 2147483648.0).astype(np.float32)
    return a.astype(np.float32, copy=False)


def _downmix(a: np.ndarray) -> np.ndarray:
    """[T] stays; [T, C] or [C, T] (shape checked by `_layout`) is averaged to mono."""
    if a.ndim == 1:
        return np.ascontiguousarray(a, dtype=np.float32)
    if a.size == 0:
        return np.zeros(0, np.float32)
    axis = 1 if a.shape[1] <= a.shape[0] else 0
    return np.ascontiguousarray(a.mean(axis=axis, dtype=np.float32))


def _finite(a: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(a).all():
        raise InvalidAudioError(f"{name} contains NaN or infinite samples")
    return a


def resample(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Polyphase resampling (scipy's anti-aliased FIR) of a 1-D signal; float32 out."""
    sr_from, sr_to = check_sample_rate(sr_from, "sr_from"), check_sample_rate(sr_to, "sr_to")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise InvalidAudioError(f"resample expects 1-D audio, got shape {x.shape}")
    if sr_from == sr_to or x.size == 0:
        return x.copy() if sr_from == sr_to else np.zeros(0, np.float32)
    up, down = _resample_factors(sr_from, sr_to)
    return resample_poly(x, up, down).astype(np.float32)


def _resample_factors(sr_from: int, sr_to: int) -> tuple[int, int]:
    """(up, down) for `resample_poly`. The filter is 20 * max(up, down) taps long, so an odd rate
    whose exact ratio needs larger terms (191,999 -> 24,000 Hz: 3.8 M taps, about 1 s of CPU) is
    resampled by the closest ratio with terms up to 1024 instead: at most 0.1 % off (to 24 kHz at
    most 0.05 %, under a cent of pitch)."""
    ratio = Fraction(sr_to, sr_from)
    if max(ratio.numerator, ratio.denominator) > _MAX_RESAMPLE_FACTOR:
        ratio = ratio.limit_denominator(_MAX_RESAMPLE_FACTOR)
    return ratio.numerator, ratio.denominator


def float_to_int16(x: np.ndarray) -> np.ndarray:
    """Float in [-1, 1] -> int16 PCM, clipped (random or hot audio must not wrap around)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidAudioError(f"float_to_int16 expects float samples, got {x.dtype}")
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def int16_to_float(x: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    """int16 PCM (array or little-endian bytes) -> float32 in [-1, 1)."""
    if isinstance(x, bytes | bytearray | memoryview):
        raw = bytes(x)  # a memoryview's len() counts items, not bytes
        if len(raw) % 2:
            raise InvalidAudioError(f"16-bit PCM bytes must have even length, got {len(raw)}")
        x = np.frombuffer(raw, dtype="<i2")
    x = np.asarray(x)
    if x.dtype != np.int16:
        raise InvalidAudioError(f"int16_to_float expects int16 samples, got {x.dtype}")
    return x.astype(np.float32) / 32768.0


def check_voice_file(voice: object) -> None:
    """A voice setting that is a path must name an existing file: checked when a plugin is
    configured, not at the first reply of a live call (what is inside is checked on load).

    Raises:
        InvalidAudioError: (a ValueError) "voice file not found: ...".
    """
    if isinstance(voice, str | Path) and not Path(voice).expanduser().is_file():
        raise InvalidAudioError(f"voice file not found: {voice}")
