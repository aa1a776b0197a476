"""`/metrics`: the engine's state and performance in the Prometheus text format.

Read from `engine.stats()` at scrape time (a custom collector), so the engine thread records its
numbers once, in `core.engine.metrics`, and nothing is double-counted here.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from core.engine.metrics import EngineStats, Histogram

_GAUGES = {
    "active_streams": "turns generating now",
    "queued_turns": "turns waiting behind their conversation's turn or for room",
    "conversations": "open conversations",
    "kv_rows_free": "KV pool rows free",
}
_COUNTERS = {
    "turns_started": "turns started", "turns_finished": "turns ended by EOS or the frame cap",
    "turns_cancelled": "turns stopped by their caller", "turns_failed": "turns ended by an error",
    "frames_total": "audio frames generated (80 ms each)", "ticks_total": "engine steps",
    "underruns": "chunks that reached a real-time listener after it ran dry",
    "prefill_rows_total": "prompt rows prefilled",
    "kv_evictions": "idle conversations' KV caches evicted",
    "kv_rebuilds": "turns that prefilled an evicted history again",
    "capacity_refusals": "turns refused for KV room (CapacityError)",
}


class EngineCollector:
    """Prometheus collector over one engine's `stats()`."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats: EngineStats = self.engine.stats()
        config = self.engine.config
        for name, doc in _GAUGES.items():
            value = getattr(stats, name)
            if value is not None:
                yield GaugeMetricFamily(f"moss_{name}", doc, value=value)
        yield GaugeMetricFamily("moss_max_streams", "turns that may generate at once",
                                value=config.max_streams)
        yield GaugeMetricFamily("moss_max_conversations", "conversations that may be open",
                                value=config.max_conversations)
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"moss_{name.removesuffix('_total')}", doc,
                                      value=getattr(stats, name))
        errors = CounterMetricFamily("moss_turn_errors", "turns ended by an error, by class",
                                     labels=["error"])
        for error, count in sorted(stats.errors.items()):
            errors.add_metric([error], count)
        yield errors
        yield _histogram("moss_ttfa_seconds", "time to first audio (lead ready -> first chunk)",
                         stats.ttfa_histogram)
        yield _histogram("moss_step_seconds", "engine tick time", stats.step_histogram)


def _histogram(name: str, doc: str, hist: Histogram | None) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    if hist is not None:
        bounds = [str(b) for b in hist.bounds] + ["+Inf"]
        cumulative = list(accumulate(hist.counts))
        family.add_metric([], list(zip(bounds, cumulative, strict=True)), sum_value=hist.total)
    return family


def render(engine: Any) -> tuple[bytes, str]:
    """The current metrics of `engine`: (body, content type)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return generate_latest(registry), CONTENT_TYPE_LATEST
