"""One exception hierarchy for the whole engine; plugins map these to their framework's errors."""

from __future__ import annotations


class MossError(Exception):
    """Base class of every error the engine raises on purpose."""


class CheckpointError(MossError, ValueError):
    """A checkpoint or config cannot be used: missing/unexpected keys, wrong shapes, bad JSON."""


class InvalidAudioError(MossError, ValueError):
    """Reference or user audio is unreadable, silent, clipped, too short or too long."""


class TextTooLongError(MossError, ValueError):
    """A turn's text exceeds `EngineConfig.max_text_chars`."""


class AdmissionError(MossError):
    """The engine is full (max_streams or max_conversations); raised at once, never a hang."""


class CapacityError(AdmissionError):
    """The engine's KV memory cannot hold this turn beside the turns already speaking, and no
    room freed up within `EngineConfig.kv_wait_s`. Raised before any audio of the turn: retry
    later (or elsewhere); unlike `ContextOverflowError` it says nothing about the conversation."""


class ContextOverflowError(MossError):
    """The voice block, the current user turn and one turn's frame cap cannot fit the context."""


class StreamCancelled(MossError):
    """The turn was cancelled; raised to code still waiting on it."""


class EngineClosed(MossError):
    """The engine was closed while the stream was active or before it started."""


class StreamFailed(MossError):
    """Serving this one stream failed at run time; `__cause__` holds the original exception."""


class ProtocolError(MossError):
    """The network engine's peer broke the wire protocol (docs/PROTOCOL.md): a malformed,
    oversized, unknown or out-of-order message, or a refused token. The socket is closed."""
