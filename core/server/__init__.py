"""The engine as a service: `moss-tts serve` (docs/PROTOCOL.md).

`create_app(engine, token=...)` builds the FastAPI app; names load lazily so `core.server.run`
and `core.server.metrics` import without FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core._lazy import lazy_exports

if TYPE_CHECKING:
    from core.server.app import create_app
    from core.server.limits import ServerLimits

__all__ = ["ServerLimits", "create_app"]

__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "create_app": "core.server.app",
    "ServerLimits": "core.server.limits",
})
