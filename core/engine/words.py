"""The engine's view of word timing: one small adapter over `core.timings.WordTimingEstimator`.

The engine only needs four things per turn: feed text, feed emitted frames (with their energy),
release the remaining words when the turn ends, and ask what was heard by a playback time.
"""

from __future__ import annotations

from core.timings import WordTiming, WordTimingEstimator


class TurnWords:
    """Word timings of one turn, released as audio is emitted."""

    def __init__(self, frame_s: float) -> None:
        self._est = WordTimingEstimator(frame_s=frame_s)

    def push_text(self, delta: str) -> None:
        self._est.push_text(delta)

    def end_text(self) -> None:
        self._est.end_text()

    def add_frames(self, energies: list[float]) -> list[WordTiming]:
        """Audio of `len(energies)` more frames was emitted; the words it completes."""
        return self._est.push_frames(len(energies), energies)

    def finish(self) -> list[WordTiming]:
        """The turn's audio is complete: every remaining word, within the audio emitted."""
        return self._est.end_audio()

    def heard_text(self, played_s: float) -> str:
        return self._est.heard_text(played_s)
