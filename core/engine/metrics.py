"""Engine counters and recent-window histograms, read through `engine.stats()`.

The engine thread records; any thread reads a consistent snapshot (`EngineStats`), so plugins and
benchmarks get time to first audio, throughput and underruns without touching engine internals.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

TTFA_BUCKETS_S = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
STEP_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)


@dataclass(frozen=True, slots=True)
class Histogram:
    """Observations since start: `counts[i]` in (bounds[i-1], bounds[i]], the last one above
    every bound; their sum and count (an exporter makes the buckets cumulative)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # one per bound, then one for +Inf
    total: float
    count: int


class _Buckets:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts = bounds, [0] * (len(bounds) + 1)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.total += value
        self.count += 1

    def snapshot(self) -> Histogram:
        return Histogram(self.bounds, tuple(self.counts), self.total, self.count)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's state and recent performance (times in seconds)."""

    active_streams: int  # turns generating now
    queued_turns: int  # turns waiting: behind their conversation's turn, or for a free slot
    conversations: int  # open conversations
    turns_started: int
    turns_finished: int
    turns_cancelled: int
    turns_failed: int
    frames_total: int
    frames_per_s: float  # over the last `window_s` seconds
    ticks_total: int
    step_ms_p50: float | None
    step_ms_p95: float | None
    ttfa_p50_s: float | None  # lead ready (12th token or end of text) -> first chunk
    ttfa_p95_s: float | None
    underruns: int  # chunks that arrived after a real-time listener ran dry (not starvation)
    kv_rows_free: int | None
    prefill_rows_total: int = 0  # prompt rows prefilled (turns and voice prefixes)
    prefix_prefills: int = 0  # system+voice prefixes prefilled into the shared prefix cache
    prefix_forks: int = 0  # conversation caches started from a shared prefix (not prefilled)
    kv_evictions: int = 0  # idle conversations' KV caches evicted to make room (rebuilt later)
    kv_rebuilds: int = 0  # turns that prefilled their evicted history again
    prefix_evictions: int = 0  # cached voice prefixes evicted to make room
    capacity_waits: int = 0  # turns that waited to start for KV pool room
    capacity_refusals: int = 0  # turns refused with CapacityError after `kv_wait_s`
    ttfa_rebuild_p95_s: float | None = None  # first audio of turns that rebuilt their KV
    ttfa_cached_p95_s: float | None = None  # first audio of the other turns
    ttfa_histogram: Histogram | None = None  # every first audio since start
    step_histogram: Histogram | None = None  # every tick since start (seconds)
    errors: dict[str, int] = field(default_factory=dict)  # turns ended by an error, by class


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1)))))
    return ordered[rank]


class Metrics:
    """Thread-safe counters; the engine thread writes, `snapshot` may be called from anywhere."""

    def __init__(self, window_s: float = 5.0, keep: int = 1024) -> None:
        self._lock = threading.Lock()
        self.window_s = window_s
        self._frame_times: deque[tuple[float, int]] = deque()
        self._step_ms: deque[float] = deque(maxlen=keep)
        self._ttfa: deque[float] = deque(maxlen=keep)
        self._ttfa_rebuild: deque[float] = deque(maxlen=keep)
        self._ttfa_cached: deque[float] = deque(maxlen=keep)
        self._ttfa_hist, self._step_hist = _Buckets(TTFA_BUCKETS_S), _Buckets(STEP_BUCKETS_S)
        self._errors: Counter[str] = Counter()
        self.counts = dict.fromkeys(
            ("turns_started", "turns_finished", "turns_cancelled", "turns_failed",
             "frames_total", "ticks_total", "underruns", "prefill_rows", "prefix_prefills",
             "prefix_forks", "kv_evictions", "kv_rebuilds", "prefix_evictions",
             "capacity_waits", "capacity_refusals"), 0
        )

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def record_error(self, error: BaseException) -> None:
        """A turn ended by `error` (its class name is the metrics label)."""
        with self._lock:
            self._errors[type(error).__name__] += 1

    def record_step(self, seconds: float, frames: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.counts["ticks_total"] += 1
            self.counts["frames_total"] += frames
            self._step_ms.append(seconds * 1000.0)
            self._step_hist.observe(seconds)
            self._frame_times.append((now, frames))
            self._trim(now)

    def record_ttfa(self, seconds: float, *, rebuild: bool = False) -> None:
        """First audio of a turn; `rebuild`: its history's KV was prefilled again first."""
        with self._lock:
            self._ttfa.append(seconds)
            self._ttfa_hist.observe(seconds)
            (self._ttfa_rebuild if rebuild else self._ttfa_cached).append(seconds)

    def _trim(self, now: float) -> None:
        while self._frame_times and now - self._frame_times[0][0] > self.window_s:
            self._frame_times.popleft()

    def snapshot(
        self, *, active: int, queued: int, conversations: int, kv_rows_free: int | None,
        now: float | None = None,
    ) -> EngineStats:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            frames = sum(n for _, n in self._frame_times)
            span = (now - self._frame_times[0][0]) if self._frame_times else 0.0
            fps = frames / max(span, 1e-3) if frames else 0.0
            steps, ttfa, c = list(self._step_ms), list(self._ttfa), dict(self.counts)
            rebuilt, cached = list(self._ttfa_rebuild), list(self._ttfa_cached)
            hists = self._ttfa_hist.snapshot(), self._step_hist.snapshot()
            errors = dict(self._errors)
        return EngineStats(
            active_streams=active, queued_turns=queued, conversations=conversations,
            turns_started=c["turns_started"], turns_finished=c["turns_finished"],
            turns_cancelled=c["turns_cancelled"], turns_failed=c["turns_failed"],
            frames_total=c["frames_total"], frames_per_s=fps, ticks_total=c["ticks_total"],
            step_ms_p50=percentile(steps, 50), step_ms_p95=percentile(steps, 95),
            ttfa_p50_s=percentile(ttfa, 50), ttfa_p95_s=percentile(ttfa, 95),
            underruns=c["underruns"], kv_rows_free=kv_rows_free,
            prefill_rows_total=c["prefill_rows"], prefix_prefills=c["prefix_prefills"],
            prefix_forks=c["prefix_forks"], kv_evictions=c["kv_evictions"],
            kv_rebuilds=c["kv_rebuilds"], prefix_evictions=c["prefix_evictions"],
            capacity_waits=c["capacity_waits"], capacity_refusals=c["capacity_refusals"],
            ttfa_rebuild_p95_s=percentile(rebuilt, 95), ttfa_cached_p95_s=percentile(cached, 95),
            ttfa_histogram=hists[0], step_histogram=hists[1], errors=errors,
        )
