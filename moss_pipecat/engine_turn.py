"""One reply of a call: the Pipecat audio context and the engine `TurnStream` behind it."""

from __future__ import annotations

import asyncio
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loguru import logger

from core import TurnStream
from core.errors import MossError, TextTooLongError

if TYPE_CHECKING:
    from core.remote import RemoteTurnStream


@dataclass(eq=False)
class EngineTurn:
    """One audio context = one engine turn; text pushed while no stream is open (the engine
    refused the turn) is kept here and dropped with it."""

    context_id: str
    seq: int  # order of the reply among this call's replies
    max_chars: int  # the engine's per-turn text limit
    pending: list[str] = field(default_factory=list)
    text: str = ""
    ended: bool = False
    truncated: bool = False  # text went over the limit: the rest of this reply is dropped
    cancelled: bool = False
    played_s: float | None = None  # where the turn was cut, when it was
    interruptible: bool = True
    stream: TurnStream | RemoteTurnStream | None = None  # once the engine turn is open
    task: asyncio.Task | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, text: str) -> None:
        """Queue `text` for the turn. Over the engine's limit the turn keeps what it has, ends
        its text, and drops the rest of the reply (TextTooLongError is raised once), the same
        whether or not the engine turn is open yet."""
        if self.truncated:
            return
        if len(self.text) + len(text) > self.max_chars:
            self.truncated = True
            self.end()
            raise TextTooLongError(
                f"reply text would be {len(self.text) + len(text)} characters, more than "
                f"max_text_chars={self.max_chars}; the rest of the reply is not spoken"
            )
        if self.stream is not None:
            self.stream.push_text(text)
        else:
            self.pending.append(text)
        self.text += text

    def end(self) -> None:
        """End of the reply's text (idempotent); the engine may now finish the last sentence."""
        if self.ended:
            return
        self.ended = True
        if self.stream is not None:
            self.stream.end_text()

    def attach(self, stream: TurnStream | RemoteTurnStream) -> None:
        """The engine turn opened: hand it the text that arrived while it was queued."""
        self.stream = stream
        for text in self.pending:
            stream.push_text(text)
        self.pending.clear()
        if self.ended:
            stream.end_text()

    def cancel(self, played_s: float) -> None:
        """Stop generating; the conversation keeps the first `played_s` seconds (what was heard)."""
        self.cancelled, self.played_s = True, played_s
        if self.stream is not None:
            try:
                self.stream.cancel(played_s=played_s)
            except MossError as e:  # e.g. the next turn already started: nothing left to cut
                logger.debug(f"MOSS turn {self.context_id}: cancel ignored ({e})")


def is_cjk(word: str) -> bool:
    """Words of scripts written without spaces carry their own spacing (per-character timings)."""
    return any(unicodedata.east_asian_width(c) in ("W", "F") for c in word) and " " not in word
