"""Voices: reference audio validated, encoded once to 16 codebooks, cached by content hash.

Validation policy for reference (voice prompt) audio, checked on the input before resampling
(`core.audio.check_reference_audio`, pure, so the CLI applies it before any weights load):

- unreadable / NaN / inf / bad dtype or shape: `InvalidAudioError` from `core.audio.read_audio`;
- too short: under `min_seconds` (default 1.0 s) there is too little voice to clone;
- too long: over `max_seconds` (default 30 s) is **rejected, not trimmed**: every second costs
  12.5 context rows in every conversation using the voice, and a silent cut could end mid-word;
  the user picks the excerpt;
- silent: peak below `silence_peak` (default 1e-3, -60 dBFS);
- clipped: more than `clip_fraction` (default 1 %) of samples at or beyond 0.99 full scale.

The trailing partial frame (the last `len % 1920` samples at 24 kHz, < 80 ms) is dropped, never
zero-padded: upstream's padded frame has codes that do not depend on the audio. User audio
(`encode_user_audio`) is lenient: only unreadable or non-finite input fails; short is fine.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.audio import (
    REFERENCE_CLIP_FRACTION,
    REFERENCE_MAX_SECONDS,
    REFERENCE_MIN_SECONDS,
    REFERENCE_SILENCE_PEAK,
    AudioSource,
    check_reference_audio,
    read_audio,
    resample,
)
from core.codec import MossAudioCodec
from core.errors import InvalidAudioError

NUM_CODEBOOKS = 16


@dataclass(frozen=True)
class Voice:
    """An encoded voice prompt: what the prompt builder needs, plus its identity."""

    codes: torch.Tensor = field(repr=False)  # Long[N, 16] on CPU
    key: str  # sha256 of the source content (and its declared sample rate)
    duration_s: float  # duration of the encoded frames (N * 0.08 s)

    def __post_init__(self) -> None:
        assert self.codes.dtype == torch.long and self.codes.device.type == "cpu", "codes: Long CPU"
        assert self.codes.dim() == 2 and self.codes.shape[1] == NUM_CODEBOOKS, "codes: [N, 16]"


def content_key(source: AudioSource, sample_rate: int | None) -> str:
    """Hash of what the user handed over; for files, the file bytes (renames still hit)."""
    h = hashlib.sha256()
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if not path.is_file():
            raise InvalidAudioError(f"audio file not found: {path}")
        h.update(path.read_bytes())
    elif isinstance(source, bytes | bytearray | memoryview):
        h.update(bytes(source))
    else:
        array = np.asarray(source.detach().cpu() if hasattr(source, "detach") else source)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    h.update(f"|sr={sample_rate}".encode())
    return h.hexdigest()


class VoiceEncoder:
    """Turns reference audio into a `Voice` (sync; the engine calls it on its own thread)."""

    def __init__(
        self,
        codec: MossAudioCodec,
        *,
        min_seconds: float = REFERENCE_MIN_SECONDS,
        max_seconds: float = REFERENCE_MAX_SECONDS,
        silence_peak: float = REFERENCE_SILENCE_PEAK,
        clip_fraction: float = REFERENCE_CLIP_FRACTION,
        cache_size: int = 64,
    ) -> None:
        if not 0 < min_seconds <= max_seconds:
            raise ValueError(
                f"need 0 < min_seconds <= max_seconds, got {min_seconds}, {max_seconds}"
            )
        self.codec = codec
        self.min_seconds, self.max_seconds = min_seconds, max_seconds
        self.silence_peak, self.clip_fraction = silence_peak, clip_fraction
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Voice] = OrderedDict()
        self._lock = threading.Lock()
        self.encodes = 0  # how many times the codec actually ran (cache misses)

    def load(self, source: AudioSource, sample_rate: int | None = None) -> Voice:
        """Read, validate, resample to 24 kHz and encode `source`; cached by content hash."""
        key = content_key(source, sample_rate)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        audio, rate = read_audio(source, sample_rate)
        self._validate(audio, rate)
        codes = self._encode(audio, rate)
        voice = Voice(codes=codes, key=key, duration_s=codes.shape[0] * self._frame_seconds)
        with self._lock:
            self._cache[key] = voice
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return voice

    def encode_user_audio(self, pcm: AudioSource, sample_rate: int) -> torch.Tensor:
        """User turn audio -> Long[N, 16] on CPU; empty or sub-frame audio gives zero frames."""
        audio, rate = read_audio(pcm, sample_rate)
        return self._encode(audio, rate)

    @property
    def _frame_seconds(self) -> float:
        return self.codec.frame_samples / self.codec.sample_rate

    def _validate(self, audio: np.ndarray, rate: int) -> None:
        check_reference_audio(
            audio, rate, min_seconds=self.min_seconds, max_seconds=self.max_seconds,
            silence_peak=self.silence_peak, clip_fraction=self.clip_fraction,
        )

    def _encode(self, audio: np.ndarray, rate: int) -> torch.Tensor:
        audio = resample(audio, rate, self.codec.sample_rate)
        if audio.shape[0] < self.codec.frame_samples:
            return torch.zeros(0, NUM_CODEBOOKS, dtype=torch.long)
        self.encodes += 1
        codes = self.codec.encode(torch.from_numpy(audio), n_quantizers=NUM_CODEBOOKS)
        return codes.cpu()
