"""ServerLimits: the bounds one served engine puts on each client, so that no socket can make
the server buffer, decode or hold more than its share (docs/PROTOCOL.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Per-socket and per-request bounds of `create_app`.

    Attributes:
        max_message_bytes: largest frame (text or binary) a socket may send; beyond it the
            socket gets a `ProtocolError` and is closed with 1009.
        max_voice_bytes: largest `POST /v1/voices` body (413 beyond).
        idle_timeout_s: a socket that sends nothing for this long while none of its turns is
            running is closed (1001), so an abandoned client cannot hold a conversation slot.
        voice_registry_size: voices (key -> codes) the server remembers, least recently used
            dropped first; a client sends a voice's codes once per socket anyway.
        max_users_per_speak: user turns one `speak` may carry.
        kept_turns: a socket's turns whose streams stay addressable by `played` (a late
            `mark_played` on an older turn is ignored, as the engine itself would).
        resume_grace_s: how long the conversation of a socket that dropped (no `close`) waits
            for its session's next socket before it is closed.
        max_conversations_per_client: conversations one signed client token (`moss-tts
            token`) may hold open at once (AdmissionError beyond); the shared secret has none.
    """

    max_message_bytes: int = 4 << 20
    max_voice_bytes: int = 16 << 20
    idle_timeout_s: float = 300.0
    voice_registry_size: int = 256
    max_users_per_speak: int = 64
    kept_turns: int = 64
    resume_grace_s: float = 30.0
    max_conversations_per_client: int = 32

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_voice_bytes", "voice_registry_size",
                     "max_users_per_speak", "kept_turns", "max_conversations_per_client"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ServerLimits.{name} must be a positive int, got {value!r}")
        for name in ("idle_timeout_s", "resume_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerLimits.{name} must be > 0, got {getattr(self, name)}")
