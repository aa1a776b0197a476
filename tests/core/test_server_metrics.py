"""`/metrics` renders the engine's own numbers in the Prometheus format (parsed back here)."""

from __future__ import annotations

import pytest
from engine_kit import build_engine, load_parts
from prometheus_client.parser import text_string_to_metric_families

from core import SamplingParams
from core.errors import StreamFailed
from core.server.metrics import render


@pytest.fixture(scope="module")
def parts(tiny_dirs):
    return load_parts(tiny_dirs)


def _samples(engine) -> dict[tuple[str, tuple], float]:
    body, content_type = render(engine)
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


async def test_metrics_count_turns_errors_and_first_audio(parts):
    """Prevents an exporter that shows zeros or loses errors: a finished turn, a turn that
    failed (no text for text_timeout_s) and the first-audio histogram are all in the scrape."""
    engine = build_engine(parts, text_timeout_s=0.3)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=1))
        stream = conv.speak()
        stream.push_text("Hello there.")
        stream.end_text()
        assert [c async for c in stream]
        silent = conv.speak()  # never gets text: fails after text_timeout_s
        with pytest.raises(StreamFailed):
            async for _ in silent:
                pass
        got = _samples(engine)
        assert got[("moss_turns_finished_total", ())] == 1
        assert got[("moss_turns_failed_total", ())] == 1
        assert got[("moss_turn_errors_total", (("error", "StreamFailed"),))] == 1
        assert got[("moss_ttfa_seconds_count", ())] == 1
        assert got[("moss_ttfa_seconds_bucket", (("le", "+Inf"),))] == 1
        assert got[("moss_step_seconds_count", ())] == got[("moss_ticks_total", ())] > 0
        assert got[("moss_conversations", ())] == 1 and got[("moss_max_streams", ())] == 4
    finally:
        engine.close()
