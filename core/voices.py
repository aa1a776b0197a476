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

Before any of that, `VoiceEncoder.check` bounds the input from its arguments, shape or header
(`core.audio.inspect_audio`: rate 8..192 kHz, at most 8 channels, at most `max_seconds`, encoded
size), so an over-long or absurd file is refused without being decoded or hashed.

The trailing partial frame (the last `len % 1920` samples at 24 kHz, < 80 ms) is dropped, never
zero-padded: upstream's padded frame has codes that do not depend on the audio. User audio
(`encode_user_audio`) is lenient: only unreadable, non-finite or over-long input fails; short is
fine.

Concurrent loads of the same content (two rooms starting with one voice) share one encode: the
first loader encodes, later ones wait for its voice or its error (an in-flight map keyed by the
content hash); after an error the next load tries again. A file already loaded is found by its
path, size and modification time, so plugins that load their voice setting before every turn
(or every room) need no cache of their own: an unchanged file is neither read nor hashed again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import Future
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
    inspect_audio,
    read_audio,
    resample,
    to_numpy,
)
from core.codec import MossAudioCodec
from core.errors import InvalidAudioError
from core.values import NUM_CODEBOOKS, Voice


def file_stamp(
    source: AudioSource, sample_rate: int | None
) -> tuple[str, int, int, int | None] | None:
    """(path, size, modification time, rate) of a voice file: a reload of an unchanged file
    skips reading and hashing it (None for in-memory audio)."""
    if not isinstance(source, str | Path):
        return None
    try:
        st = Path(source).expanduser().resolve().stat()
    except OSError:
        return None
    return str(Path(source).expanduser().resolve()), st.st_size, st.st_mtime_ns, sample_rate


def content_key(source: AudioSource, sample_rate: int | None) -> str:
    """Hash of what the user handed over; for files, the file bytes (renames still hit)."""
    h = hashlib.sha256()
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if not path.is_file():
            raise InvalidAudioError(f"audio file not found: {path}")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):  # in pieces: never the whole file in memory
                h.update(chunk)
    elif isinstance(source, bytes | bytearray | memoryview):
        h.update(bytes(source))
    else:
        array = np.asarray(to_numpy(source, "source"))
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(np.ascontiguousarray(array))  # hashed through the buffer, not a copy of it
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
        self._inflight: dict[str, Future[Voice]] = {}  # content key -> the encode under way
        self._by_file: dict[tuple[str, int, int, int | None], str] = {}  # file stamp -> key
        self._lock = threading.Lock()
        self.encodes = 0  # how many times the codec actually ran (cache misses)

    def check(self, source: AudioSource, sample_rate: int | None = None) -> None:
        """Refuse what can be refused without decoding (`core.audio.inspect_audio`): cheap, so
        the engine runs it on the caller's side and bad input never reaches its thread."""
        inspect_audio(source, sample_rate, name="source", max_seconds=self.max_seconds)

    def load(self, source: AudioSource, sample_rate: int | None = None) -> Voice:
        """Read, validate, resample to 24 kHz and encode `source`; cached by content hash.

        A load of content that another thread is encoding waits for that encode and returns
        its voice (or raises its error) instead of running the codec a second time.
        """
        self.check(source, sample_rate)
        stamp = file_stamp(source, sample_rate)
        with self._lock:
            known = self._by_file.get(stamp) if stamp is not None else None
            if known is not None and known in self._cache:  # same file, unchanged: not read
                self._cache.move_to_end(known)
                return self._cache[known]
        key = content_key(source, sample_rate)
        with self._lock:
            if stamp is not None:
                self._by_file[stamp] = key
                while len(self._by_file) > self.cache_size:
                    self._by_file.pop(next(iter(self._by_file)))
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            pending = self._inflight.get(key)
            first = pending is None
            if first:
                pending = self._inflight[key] = Future()
        if first:
            return self._load_first(key, pending, source, sample_rate)
        return pending.result()

    def encode_user_audio(
        self, pcm: AudioSource, sample_rate: int | None, max_seconds: float | None = None
    ) -> torch.Tensor:
        """User turn audio -> Long[N, 16] on CPU; empty or sub-frame audio gives zero frames.

        `max_seconds` is `EngineConfig.max_user_audio_s` (checked again here, and decoding
        stops there, in case a file changed after the caller-side check).
        """
        audio, rate = read_audio(pcm, sample_rate, max_seconds=max_seconds,
                                 limit="max_user_audio_s")
        return self._encode(audio, rate)

    def _load_first(
        self, key: str, pending: Future[Voice], source: AudioSource, sample_rate: int | None
    ) -> Voice:
        """The first loader of `key` encodes, then hands its voice (or error) to the waiters."""
        try:
            audio, rate = read_audio(source, sample_rate, name="source",
                                     max_seconds=self.max_seconds)
            self._validate(audio, rate)
            codes = self._encode(audio, rate)
            voice = Voice(codes=codes, key=key, duration_s=codes.shape[0] * self._frame_seconds)
        except BaseException as exc:  # every waiter must wake up, whatever went wrong
            with self._lock:
                del self._inflight[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[key]
            self._cache[key] = voice
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        pending.set_result(voice)
        return voice

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
