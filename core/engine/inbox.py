"""The engine's inbox: admission counts and the command queue, under one lock.

Callers (any thread) are admitted here and post typed commands (`core.engine.commands`); the
engine thread takes them all at the start of each tick. Admission is decided at call time, so a
full engine refuses at once instead of queueing work it cannot start.
"""

from __future__ import annotations

import threading
from collections import deque

from core.engine.commands import CloseConversation, Command
from core.errors import AdmissionError, EngineClosed


class Inbox:
    """Lock-protected admission state, command queue and wake-up event."""

    def __init__(
        self, max_streams: int, max_conversations: int, max_turns_per_conversation: int
    ) -> None:
        self.max_streams, self.max_conversations = max_streams, max_conversations
        self.max_turns = max_turns_per_conversation
        self._lock = threading.Lock()
        self._commands: deque[Command] = deque()
        self._closed = False
        self._open_convs: set[int] = set()
        self._outstanding: dict[int, int] = {}  # conv id -> turns queued or active
        self._admitted: dict[int, int] = {}  # turn id -> conv id, while counted above
        self._next_id = 0
        self._wakeup = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- caller side --------------------------------------------------------------------------
    def post(self, command: Command, *, strict: bool = True) -> None:
        """Queue a command for the engine thread (EngineClosed when closed and `strict`)."""
        with self._lock:
            if self._closed:
                if strict:
                    raise EngineClosed("the engine was closed")
                return
            self._commands.append(command)
        self._wakeup.set()

    def open_conversation(self) -> int:
        """Count a new conversation; returns its id.

        Raises:
            AdmissionError: `max_conversations` are already open.
            EngineClosed: the engine was closed.
        """
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine was closed")
            if len(self._open_convs) >= self.max_conversations:
                raise AdmissionError(f"max_conversations={self.max_conversations} already open")
            self._next_id += 1
            self._open_convs.add(self._next_id)
            return self._next_id

    def close_conversation(self, conv_id: int) -> None:
        """Free the conversation's place at once; its close runs before any later command.
        Idempotent, from any number of threads."""
        with self._lock:
            if conv_id not in self._open_convs:
                return
            self._open_convs.discard(conv_id)
            if self._closed:
                return
            for turn_id in [t for t, c in self._admitted.items() if c == conv_id]:
                self._release(turn_id)
            self._commands.append(CloseConversation(conv_id))
        self._wakeup.set()

    def admit_turn(self, conv_id: int) -> int:
        """Admit a turn of `conv_id` (queued behind its active turn if any); returns its id.

        Raises:
            AdmissionError: `max_streams` other conversations are already speaking, or this one
                already has `max_turns` turns speaking or queued.
            EngineClosed: the engine was closed.
        """
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine was closed")
            busy = self._outstanding.get(conv_id, 0)
            if busy == 0 and len(self._outstanding) >= self.max_streams:
                raise AdmissionError(f"max_streams={self.max_streams} turns already speaking")
            if busy >= self.max_turns:
                raise AdmissionError(f"max_turns_per_conversation={self.max_turns} turns of this "
                                     "conversation already speaking or queued")
            self._outstanding[conv_id] = busy + 1
            self._next_id += 1
            self._admitted[self._next_id] = conv_id
            return self._next_id

    def stop_turn(self, turn_id: int, command: Command) -> None:
        """Release the turn's admission and queue its stop atomically, so the stop runs before
        any turn admitted in its place (which then finds the slot free)."""
        with self._lock:
            if self._closed:
                return
            self._release(turn_id)
            self._commands.append(command)
        self._wakeup.set()

    def release_turn(self, turn_id: int) -> None:
        """The turn ended: it no longer counts against max_streams (idempotent)."""
        with self._lock:
            self._release(turn_id)

    def _release(self, turn_id: int) -> None:
        conv_id = self._admitted.pop(turn_id, None)
        if conv_id is not None:
            self._outstanding[conv_id] -= 1
            if self._outstanding[conv_id] <= 0:
                del self._outstanding[conv_id]

    def counts(self) -> tuple[int, int]:
        """(turns queued or active, open conversations)."""
        with self._lock:
            return sum(self._outstanding.values()), len(self._open_convs)

    def close(self) -> bool:
        """Refuse new work from now on; True for the call that actually closed."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        self._wakeup.set()
        return True

    # -- engine thread ------------------------------------------------------------------------
    def wake(self) -> None:
        self._wakeup.set()

    def wait(self, timeout: float) -> None:
        self._wakeup.wait(timeout)

    def take(self) -> tuple[list[Command], bool]:
        """Clear the wake-up, then take the queued commands and whether the engine is closing
        (in that order, so no wake-up between the two is lost)."""
        self._wakeup.clear()
        with self._lock:
            commands, self._commands = list(self._commands), deque()
            return commands, self._closed
