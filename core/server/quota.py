"""ClientQuota: how many conversations one signed client may hold open at once, so one agent
process cannot take every slot of a shared server (the operator's shared secret is exempt)."""

from __future__ import annotations

from core.errors import AdmissionError


class ClientQuota:
    """One socket's claim on its client's count (`counts` is shared by the app's sockets)."""

    def __init__(self, counts: dict[str, int], client: str | None, limit: int) -> None:
        self._counts, self.client, self._limit = counts, client, limit
        self._held = False

    def acquire(self) -> None:
        """Count this socket's conversation; AdmissionError when its client is at the limit."""
        if self.client is None or self._held:
            return
        open_now = self._counts.get(self.client, 0)
        if open_now >= self._limit:
            raise AdmissionError(f"client {self.client!r} has {open_now} conversations open, "
                                 f"max_conversations_per_client={self._limit}")
        self._counts[self.client] = open_now + 1
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            left = self._counts[self.client] - 1  # type: ignore[index]
            if left:
                self._counts[self.client] = left  # type: ignore[index]
            else:
                del self._counts[self.client]  # type: ignore[arg-type]
