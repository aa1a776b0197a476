"""Pure scheduling policy: which streams advance this tick (no torch, no clocks, no threads).

Every stream that has input and is under its real-time lead cap advances one frame per tick.
Only when the frame budget (`max_batch`) or the prefill row budget (`prefill_chunk`) is exceeded
does order matter, and then the stream with the least audio buffered ahead of playback goes first
(it is the one about to run dry). Prompt prefill is chunked under its own row budget so a new turn
with a long history never stalls streams that are already speaking. `chunk_ready` decides when
a stream's sampled frames go out: holding them for a bigger chunk must not starve a listener.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StreamDemand:
    """What one stream could do this tick, as seen by the engine."""

    sid: int
    prefill_rows: int = 0  # prompt rows ready to prefill now
    prefill_samples: bool = False  # prefilling all `prefill_rows` yields the turn's first frame
    decode: bool = False  # its next step row is known (text token, or text pad after end_text)
    buffered_s: float = 0.0  # audio generated ahead of real-time playback (<= 0: about to starve)
    arrival: float = 0.0  # when the turn was admitted: FIFO among equally urgent prefills

    def __post_init__(self) -> None:
        assert self.prefill_rows >= 0, f"negative prefill rows for stream {self.sid}"
        assert not (self.decode and self.prefill_rows), f"stream {self.sid} prefills and decodes"
        assert not (self.prefill_samples and not self.prefill_rows), "sampling needs prefill rows"


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """`rows` prompt rows of stream `sid`; `samples` when the chunk completes the lead."""

    sid: int
    rows: int
    samples: bool


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One tick: prefill chunks and decode steps that share one backbone call."""

    prefill: tuple[PrefillChunk, ...] = ()
    decode: tuple[int, ...] = ()
    wake_in_s: float | None = None  # when the plan is empty: earliest time a capped stream frees

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def frames(self) -> int:
        """Frames this tick samples (decode steps plus first frames of new turns)."""
        return len(self.decode) + sum(1 for c in self.prefill if c.samples)

    @property
    def rows(self) -> int:
        return len(self.decode) + sum(c.rows for c in self.prefill)


def plan_step(
    demands: list[StreamDemand],
    *,
    max_batch: int,
    prefill_chunk: int,
    lead_s: float | None,
) -> StepPlan:
    """Choose this tick's work: deadline-first under the frame and prefill row budgets."""
    assert max_batch > 0 and prefill_chunk > 0, "budgets must be positive"
    capped_waits: list[float] = []
    frame_candidates: list[StreamDemand] = []
    prefix_only: list[StreamDemand] = []
    for d in demands:
        under_cap = lead_s is None or d.buffered_s < lead_s
        if d.decode:
            if under_cap:
                frame_candidates.append(d)
            else:
                capped_waits.append(d.buffered_s - lead_s)  # type: ignore[operator]
        elif d.prefill_rows:
            (frame_candidates if d.prefill_samples else prefix_only).append(d)

    # Least buffered first; a new turn's first frame (buffered 0) competes on the same scale.
    frame_candidates.sort(key=lambda d: (d.buffered_s, d.arrival, d.sid))
    prefix_only.sort(key=lambda d: (d.arrival, d.sid))

    decode: list[int] = []
    prefill: list[PrefillChunk] = []
    frames_left, rows_left = max_batch, prefill_chunk
    for d in frame_candidates:
        if frames_left == 0:
            break
        if d.decode:
            decode.append(d.sid)
            frames_left -= 1
        elif rows_left > 0:
            n = min(d.prefill_rows, rows_left)
            samples = n == d.prefill_rows
            prefill.append(PrefillChunk(d.sid, n, samples))
            rows_left -= n
            frames_left -= int(samples)
    for d in prefix_only:
        if rows_left == 0:
            break
        n = min(d.prefill_rows, rows_left)
        prefill.append(PrefillChunk(d.sid, n, False))
        rows_left -= n

    wake = None
    if not decode and not prefill and capped_waits:
        wake = max(0.0, min(capped_waits))
    return StepPlan(tuple(prefill), tuple(decode), wake)


def chunk_ready(pending: int, due: int, *, ahead_s: float | None, frame_s: float) -> bool:
    """Cut a chunk of the `pending` frames now? Yes once `due` frames are pending, and earlier
    when the audio the listener still has (`ahead_s`; None: not playing yet) ends before the
    rest of the chunk could arrive at real-time speed. Holding frames back for a bigger chunk
    is then what makes the listener run dry: near full load (a frame every 55-80 ms) the
    ramp's 2- and 3-frame chunks arrived after the audio before them had played out."""
    if pending >= due:
        return True
    return pending > 0 and ahead_s is not None and ahead_s < (due - pending) * frame_s


@dataclass(slots=True)
class ListenerClock:
    """A model of the listener: plays each chunk in real time from its arrival, back to back.

    It gives the audio buffered ahead of playback (the scheduling deadline and the lead cap) and
    detects underruns: a chunk arriving after the previous audio has finished playing.
    """

    playback_end: float | None = None  # when the audio delivered so far finishes playing

    def buffered_s(self, now: float, pending_s: float = 0.0) -> float:
        """Seconds of audio ahead of the listener, counting generated-but-unsent audio."""
        ahead = 0.0 if self.playback_end is None else max(0.0, self.playback_end - now)
        return ahead + pending_s

    def deliver(self, now: float, duration_s: float, *, starved: bool = False) -> bool:
        """Record a chunk delivered at `now`; True when the listener ran dry before it.

        A gap caused by text starvation (the LLM was slower than speech) is not an underrun.
        """
        late = self.playback_end is not None and now > self.playback_end
        start = now if self.playback_end is None or late else self.playback_end
        self.playback_end = start + duration_s
        return late and not starved
