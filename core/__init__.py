"""MOSS-TTS-Realtime: one shared streaming engine for real-time TTS in voice agents.

Public API::

    from core import Engine, EngineConfig, SamplingParams, Voice

The heavy names (engine, model, codec) are imported lazily on first use (PEP 562), so
`import core.errors` stays light and no submodule import can run into a circular import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from core import errors
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
    from core.conversation import Conversation, TurnView
    from core.engine import AudioChunk, Engine, EngineConfig, EngineStats, TurnStatus, TurnStream
    from core.model import SamplingParams
    from core.timings import WordTiming
    from core.voices import Voice

_LAZY = {
    "Engine": "core.engine",
    "EngineConfig": "core.engine",
    "EngineStats": "core.engine",
    "AudioChunk": "core.engine",
    "TurnStream": "core.engine",
    "TurnStatus": "core.engine",
    "Conversation": "core.conversation",
    "TurnView": "core.conversation",
    "SamplingParams": "core.model",
    "Voice": "core.voices",
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
    "SamplingParams",
    "StreamCancelled",
    "StreamFailed",
    "TextTooLongError",
    "TurnStatus",
    "TurnStream",
    "TurnView",
    "Voice",
    "WordTiming",
    "__version__",
    "errors",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
