"""The user's speech of the current turn, tapped from the session's audio input.

MOSS-TTS-Realtime conditions a reply on the user's words AND, when given, their speech (encoded by
the codec), which carries tone and pace. LiveKit has no event with the user's audio, so the tap
sits in the session's input chain: it passes every frame on unchanged and keeps the frames heard
while the session says the user is speaking (VAD), with the 0.3 s before (the VAD reports speech
only after some of it), until the next user turn takes them.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from livekit import rtc
from livekit.agents.voice.io import AudioInput

MAX_USER_AUDIO_S = 30.0  # a user turn longer than this keeps its last 30 s
PRE_ROLL_S = 0.3  # audio kept from before the VAD said "speaking" (as the Pipecat capture)


class UserAudioTap(AudioInput):
    """Pass-through `AudioInput` recording frames while `recording` is set."""

    def __init__(
        self, source: AudioInput, *, max_s: float = MAX_USER_AUDIO_S, pre_roll_s: float = PRE_ROLL_S
    ) -> None:
        super().__init__(label="moss-user-audio", source=source)
        self._max_s, self._pre_roll_s = max_s, pre_roll_s
        self._frames: deque[rtc.AudioFrame] = deque()
        self._seconds = 0.0
        self._pre: deque[rtc.AudioFrame] = deque()  # the last `pre_roll_s` while not recording
        self._recording = False

    @property
    def recording(self) -> bool:
        return self._recording

    @recording.setter
    def recording(self, on: bool) -> None:
        if on and not self._recording:  # speech began a little before the VAD said so
            for frame in self._pre:
                self._keep(frame)
        self._pre.clear()
        self._recording = on

    async def __anext__(self) -> rtc.AudioFrame:
        frame = await super().__anext__()
        if self._recording:
            self._keep(frame)
        else:
            self._pre.append(frame)
            while sum(f.duration for f in self._pre) - self._pre[0].duration >= self._pre_roll_s:
                self._pre.popleft()
        return frame

    def _keep(self, frame: rtc.AudioFrame) -> None:
        self._frames.append(frame)
        self._seconds += frame.duration
        while self._seconds > self._max_s and len(self._frames) > 1:
            self._seconds -= self._frames.popleft().duration

    def take(self) -> tuple[np.ndarray, int] | None:
        """The speech recorded since the last call, as mono int16 and its rate; None if none."""
        frames, self._frames, self._seconds = list(self._frames), deque(), 0.0
        frames = [f for f in frames if f.samples_per_channel > 0]
        if not frames:
            return None
        rate = frames[0].sample_rate
        frames = [f for f in frames if f.sample_rate == rate]  # a rate change mid-turn: keep one
        pcm = np.concatenate([_mono(f) for f in frames])
        return pcm, rate


def _mono(frame: rtc.AudioFrame) -> np.ndarray:
    samples = np.frombuffer(frame.data, dtype=np.int16)
    if frame.num_channels == 1:
        return samples.copy()
    mixed = samples.reshape(-1, frame.num_channels).astype(np.int32).mean(axis=1)
    return mixed.astype(np.int16)
