"""One reply of a call: the Pipecat audio context and the engine `TurnStream` behind it."""

from __future__ import annotations

import asyncio
import unicodedata
from dataclasses import dataclass, field

from loguru import logger

from core import SamplingParams, TurnStream
from core.errors import MossError


@dataclass(eq=False)
class EngineTurn:
    """One audio context = one engine turn; text may arrive before the stream is open."""

    context_id: str
    seq: int  # order of the reply among this call's replies
    previous: EngineTurn | None
    voice: str | None  # the voice setting this turn speaks with
    sampling: SamplingParams
    pending: list[str] = field(default_factory=list)
    text: str = ""
    ended: bool = False
    cancelled: bool = False
    played_s: float | None = None  # where the turn was cut, when it was
    interruptible: bool = True
    stream: TurnStream | None = None  # once the engine turn is open
    task: asyncio.Task | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, text: str) -> None:
        if self.stream is not None:
            self.stream.push_text(text)  # may refuse it (too long): then it is not kept
        else:
            self.pending.append(text)
        self.text += text

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.stream is not None:
            self.stream.end_text()

    def attach(self, stream: TurnStream) -> None:
        self.stream = stream
        for text in self.pending:
            stream.push_text(text)
        self.pending.clear()
        if self.ended:
            stream.end_text()

    def cancel(self, played_s: float) -> None:
        self.cancelled, self.played_s = True, played_s
        if self.stream is not None:
            try:
                self.stream.cancel(played_s=played_s)
            except MossError as e:  # e.g. the next turn already started: nothing left to cut
                logger.debug(f"MOSS turn {self.context_id}: cancel ignored ({e})")


def is_cjk(word: str) -> bool:
    """Words of scripts written without spaces carry their own spacing (per-character timings)."""
    return any(unicodedata.east_asian_width(c) in ("W", "F") for c in word) and " " not in word
