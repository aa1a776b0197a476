"""The shared streaming engine: many conversations, one model, batched steps.

Names are imported lazily so the pure policy modules (`scheduler`, `slots`, `config`) and the
light caller-side types load without the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core._lazy import lazy_exports

if TYPE_CHECKING:
    from core.engine.config import EngineConfig
    from core.engine.conversation import Conversation
    from core.engine.engine import Engine
    from core.engine.metrics import EngineStats
    from core.engine.stream import AudioChunk, TurnStatus, TurnStream

__all__ = ["AudioChunk", "Conversation", "Engine", "EngineConfig", "EngineStats", "TurnStatus",
           "TurnStream"]

__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "Engine": "core.engine.engine",
    "EngineConfig": "core.engine.config",
    "EngineStats": "core.engine.metrics",
    "Conversation": "core.engine.conversation",
    "AudioChunk": "core.engine.stream",
    "TurnStatus": "core.engine.stream",
    "TurnStream": "core.engine.stream",
})
