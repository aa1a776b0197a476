"""Fixtures for the Pipecat plugin tests: one tiny engine per test module, shared by services."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core import Engine, EngineConfig

# Small and unpaced by default (tests pace playback themselves); a module may set
# `ENGINE_OVERRIDES = {...}` (e.g. a real-time lead cap) for its own engine.
BASE_CONFIG = dict(
    max_streams=8,
    max_conversations=24,
    max_frames_per_turn=40,
    lead_s=None,
    kv_num_blocks=256,
    kv_block_size=32,
)


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest, tiny_dirs) -> Iterator[Engine]:
    """A CPU engine on the tiny checkpoint, closed after the module's tests."""
    model_dir, codec_dir = tiny_dirs
    values = {**BASE_CONFIG, **getattr(request.module, "ENGINE_OVERRIDES", {})}
    eng = Engine.from_pretrained(model_dir, codec_dir, device="cpu", config=EngineConfig(**values))
    try:
        yield eng
    finally:
        eng.close()
