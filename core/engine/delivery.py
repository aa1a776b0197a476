"""Thread -> asyncio bridge: the engine thread puts items, one asyncio loop (any thread) gets them.

Items go into a lock-protected deque first and the consumer's loop is only woken with
`loop.call_soon_threadsafe`, so the channel works whichever loop (and thread) iterates it, the
loop may be bound late (a stream created outside a running loop), and a closed loop never breaks
the producer. Nothing here blocks the engine thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class ChunkChannel(Generic[T]):
    """Single-consumer queue from the engine thread to one asyncio loop, closed with an error."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    # -- producer side (any thread) ---------------------------------------------------------
    def put(self, item: T) -> bool:
        """Queue an item; False when the channel is already closed (the item is dropped)."""
        with self._lock:
            if self._closed:
                return False
            self._items.append(item)
        self._wake()
        return True

    def close(self, error: BaseException | None = None) -> None:
        """End the channel; the consumer gets the queued items, then `error` (or the end)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._error = error
        self._wake()

    def abort(self, error: BaseException) -> None:
        """Close and drop queued items: the consumer sees `error` next (used by cancel)."""
        with self._lock:
            self._items.clear()
            if not self._closed or self._error is None:
                self._error = error
            self._closed = True
        self._wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    def _wake(self) -> None:
        loop, event = self._loop, self._event
        if loop is None or event is None:
            return
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass

    # -- consumer side (one asyncio loop) ---------------------------------------------------
    def _bind(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._event = asyncio.Event()  # event before loop: a producer never sees a stale pair
            self._loop = loop
        assert self._event is not None
        return self._event

    async def get(self) -> T:
        """Next item; raises the closing error, or `StopAsyncIteration` at a clean end."""
        event = self._bind()
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                if self._closed:
                    if self._error is not None:
                        raise self._error
                    raise StopAsyncIteration
                event.clear()
            await event.wait()
