"""MOSS-TTS-Realtime: one shared streaming engine for real-time TTS in voice agents.

Public API::

    from core import Engine, EngineConfig, SamplingParams, Voice

The heavy names (engine, model, codec) are imported lazily on first use (PEP 562), so
`import core.errors` stays light and no submodule import can run into a circular import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core import errors
from core._lazy import lazy_exports
from core.errors import (
    AdmissionError,
    CapacityError,
    CheckpointError,
    ContextOverflowError,
    EngineClosed,
    InvalidAudioError,
    MossError,
    StreamCancelled,
    StreamFailed,
    TextTooLongError,
)
from core.version import __version__

if TYPE_CHECKING:
    from core.engine import (
        AudioChunk,
        Conversation,
        Engine,
        EngineConfig,
        EngineStats,
        TurnStatus,
        TurnStream,
    )
    from core.history import TurnView
    from core.timings import WordTiming
    from core.values import PastTurn, SamplingParams, UserTurn, Voice

_LAZY = {
    "Engine": "core.engine",
    "EngineConfig": "core.engine",
    "EngineStats": "core.engine",
    "AudioChunk": "core.engine",
    "TurnStream": "core.engine",
    "TurnStatus": "core.engine",
    "Conversation": "core.engine",
    "TurnView": "core.history",
    "PastTurn": "core.values",
    "SamplingParams": "core.values",
    "UserTurn": "core.values",
    "Voice": "core.values",
    "WordTiming": "core.timings",
}

__all__ = [
    "AdmissionError",
    "AudioChunk",
    "CapacityError",
    "CheckpointError",
    "ContextOverflowError",
    "Conversation",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineStats",
    "InvalidAudioError",
    "MossError",
    "PastTurn",
    "SamplingParams",
    "StreamCancelled",
    "StreamFailed",
    "TextTooLongError",
    "TurnStatus",
    "TurnStream",
    "TurnView",
    "UserTurn",
    "Voice",
    "WordTiming",
    "__version__",
    "errors",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)
