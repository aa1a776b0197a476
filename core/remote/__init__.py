"""The engine over the network: `RemoteEngine(url, token=...)` where an `Engine` went
(docs/PROTOCOL.md). Names load lazily, so `import core.remote` needs no `websockets`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core._lazy import lazy_exports

if TYPE_CHECKING:
    from core.remote.client import RemoteEngine
    from core.remote.conversation import RemoteConversation
    from core.remote.stream import RemoteTurnStream

__all__ = ["RemoteConversation", "RemoteEngine", "RemoteTurnStream"]

__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "RemoteEngine": "core.remote.client",
    "RemoteConversation": "core.remote.conversation",
    "RemoteTurnStream": "core.remote.stream",
})
