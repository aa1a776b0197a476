"""ServerControl: what an operator (or Ray Serve) changes on a running server from outside the
sockets: which server this is (told to clients, so a reconnect can see where it landed) and
whether it still takes new conversations (drain before scale-down or shutdown)."""

from __future__ import annotations

import os
import socket
import uuid


class ServerControl:
    """One server's identity and admission switch (any thread)."""

    def __init__(self, server_id: str | None = None) -> None:
        self.server_id = server_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._draining = False

    @property
    def draining(self) -> bool:
        """True once `drain()` was called: new conversations are refused (AdmissionError),
        `/ready` answers 503, open conversations go on."""
        return self._draining

    def drain(self) -> None:
        self._draining = True
