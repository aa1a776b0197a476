"""The server's voices: key -> `Voice`, bounded, least recently used dropped first.

Voices encoded here (`POST /v1/voices`) are trusted under their content key. Codes a client
sends (`voice` message) are checked (shape, code range, length) and reuse the registered voice
when they equal it; other codes get a key derived from the codes themselves, so a client can
never make another client's voice key name different codes.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

from core import wire
from core.audio import REFERENCE_MAX_SECONDS
from core.errors import ProtocolError
from core.model.config import AUDIO_PAD_CODE
from core.timings import FRAME_S
from core.values import NUM_CODEBOOKS, Voice

MAX_VOICE_FRAMES = int(REFERENCE_MAX_SECONDS / FRAME_S) + 1


class VoiceRegistry:
    """Bounded LRU map of voice keys to voices (any thread)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._voices: OrderedDict[str, Voice] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Voice | None:
        with self._lock:
            voice = self._voices.get(key)
            if voice is not None:
                self._voices.move_to_end(key)
            return voice

    def add(self, voice: Voice) -> None:
        with self._lock:
            self._voices[voice.key] = voice
            self._voices.move_to_end(voice.key)
            while len(self._voices) > self._size:
                self._voices.popitem(last=False)

    def from_wire(self, key: str, frames: int, data: bytes) -> Voice:
        """The voice a `voice` message carries (int16 `[frames, 16]`), checked."""
        if len(data) != frames * NUM_CODEBOOKS * 2:
            raise ProtocolError(f"voice codes need {frames * NUM_CODEBOOKS * 2} bytes, "
                                f"got {len(data)}")
        codes = wire.codes_from_wire(data)
        if int(codes.min()) < 0 or int(codes.max()) >= AUDIO_PAD_CODE:
            raise ProtocolError(f"voice codes must be in [0, {AUDIO_PAD_CODE})")
        known = self.get(key)
        if known is not None and torch.equal(known.codes, codes):
            return known
        derived = "codes:" + hashlib.sha256(data).hexdigest()
        voice = self.get(derived) or Voice(codes, derived, frames * FRAME_S)
        self.add(voice)
        return voice

