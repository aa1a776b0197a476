"""`EngineLike`: what the plugins need of an engine, met by `Engine` and by
`core.remote.RemoteEngine` alike (checked structurally, so nothing here imports the client).

A remote engine has no `stats()` (docs/PROTOCOL.md): what needs it (e.g. LiveKit's worker load)
must check for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from core.audio import AudioSource
    from core.engine.config import EngineConfig
    from core.values import PastTurn, SamplingParams, Voice


@runtime_checkable
class EngineLike(Protocol):
    """An in-process `Engine` or a `RemoteEngine`: voices, conversations, close.

    `conversation()` returns a `Conversation` or a `RemoteConversation` (the same interface:
    `speak`, `add_user_turn`, `turns`, `history`, `close`/`aclose`, `voice`, `sampling`).
    """

    config: EngineConfig

    @property
    def closed(self) -> bool: ...

    def check_voice(self, source: AudioSource, sample_rate: int | None = None) -> None: ...

    async def load_voice(self, source: AudioSource, sample_rate: int | None = None) -> Voice: ...

    def conversation(self, voice: Voice | None = None, sampling: SamplingParams | None = None,
                     history: Sequence[PastTurn] = (), *,
                     session_id: str | None = None) -> Any: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...
