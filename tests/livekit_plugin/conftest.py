"""Fixtures of the LiveKit plugin tests: one small engine per module on the tiny checkpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core import Engine, EngineConfig


@pytest.fixture(scope="module")
def engine(tiny_dirs) -> Iterator[Engine]:
    """A CPU engine small enough for 2 busy cores: short turns, few slots, no real-time lead cap
    (tests pace playback themselves)."""
    model_dir, codec_dir = tiny_dirs
    config = EngineConfig(
        max_streams=8, max_conversations=16, max_frames_per_turn=40, lead_s=None,
        kv_num_blocks=256, kv_block_size=32,
    )
    eng = Engine.from_pretrained(model_dir, codec_dir, device="cpu", config=config)
    yield eng
    eng.close()
