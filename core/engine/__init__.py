"""The shared streaming engine: many conversations, one model, batched steps.

Names are imported lazily (PEP 562) so the pure policy modules (`scheduler`, `slots`, `config`)
load without torch or the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.engine.config import EngineConfig
    from core.engine.engine import Engine
    from core.engine.metrics import EngineStats
    from core.engine.stream import AudioChunk, TurnStatus, TurnStream

_LAZY = {
    "Engine": "core.engine.engine",
    "EngineConfig": "core.engine.config",
    "EngineStats": "core.engine.metrics",
    "AudioChunk": "core.engine.stream",
    "TurnStatus": "core.engine.stream",
    "TurnStream": "core.engine.stream",
}

__all__ = ["AudioChunk", "Engine", "EngineConfig", "EngineStats", "TurnStatus", "TurnStream"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'core.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
