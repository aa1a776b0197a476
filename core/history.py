"""A conversation's canonical history: the system+voice prefix and every turn, as rows.

The history is what each turn really was (for an interrupted assistant turn: what the listener
heard), laid out as the model was trained. It is plain data: no KV cache, no threads. The engine
keeps a KV cache of a prefix of these rows (`core.engine.sequence.KVSequence`) and, before each
assistant turn, cuts that cache at its first difference with `History.begin_assistant()`'s rows
and prefills only the rest. That one rule covers the next turn, an interruption (the heard turn
differs from what was fed), trimming the oldest turns (the context budget), a voice change (only
the system block still matches) and an evicted cache (everything is prefilled again).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from core.errors import ContextOverflowError
from core.values import NUM_CODEBOOKS, PastTurn

if TYPE_CHECKING:
    from core.prompt import PromptBuilder
    from core.values import Voice

USER, ASSISTANT = "user", "assistant"


@dataclass(frozen=True, slots=True)
class TurnView:
    """Read-only view of one turn: role, its text (as heard, for an interrupted assistant turn)
    and its audio frames (user speech frames, or assistant frames generated / heard)."""

    role: str
    text: str
    frames: int


@dataclass(slots=True)
class HistoryTurn:
    """One turn as the history holds it; rows are built on demand (they depend on `first`)."""

    role: str
    text: str
    codes: Tensor | None = None  # Long[F, 16]: user speech codes or assistant frames
    text_ids: list[int] | None = None  # assistant: the text ids laid out in its rows
    turn_id: int | None = None  # assistant: the TurnStream it came from
    _rows: dict[bool, Tensor] = field(default_factory=dict)
    _past: PastTurn | None = None

    def rows(self, builder: PromptBuilder, *, first: bool) -> Tensor:
        if first not in self._rows:
            if self.role == USER:
                self._rows[first] = builder.user_rows(self.text, self.codes, first=first)
            else:
                codes = self.codes
                if codes is None:
                    codes = torch.zeros(0, NUM_CODEBOOKS, dtype=torch.long)
                self._rows[first] = torch.cat([
                    builder.assistant_prefix_rows(first=first),
                    builder.assistant_turn_rows(self.text_ids or [], codes),
                ])
        return self._rows[first]

    def view(self) -> TurnView:
        return TurnView(self.role, self.text, 0 if self.codes is None else int(self.codes.shape[0]))

    def past(self) -> PastTurn:
        """This turn as a value (one object per turn: a changed turn is a new HistoryTurn)."""
        if self._past is None:
            self._past = PastTurn(self.role, self.text, self.codes, tuple(self.text_ids or ()))
        return self._past


class PrefixRows:
    """System + voice-block rows, built once per voice (key: the voice's content hash).

    Bounded (least recently used voices go first) so a long-running server that sees many
    voices does not grow without end; histories keep their own reference to the rows.
    """

    def __init__(self, builder: PromptBuilder, max_voices: int = 1024) -> None:
        self._builder = builder
        self._rows: OrderedDict[str | None, Tensor] = OrderedDict()
        self._max_voices = max_voices
        self._lock = threading.Lock()

    def rows(self, voice: Voice | None) -> Tensor:
        key = None if voice is None else voice.key
        with self._lock:
            if key not in self._rows:
                parts = [self._builder.system_rows()]
                if voice is not None:
                    parts.append(self._builder.voice_rows(voice.codes))
                self._rows[key] = torch.cat(parts)
                while len(self._rows) > max(1, self._max_voices):
                    self._rows.popitem(last=False)
            self._rows.move_to_end(key)
            return self._rows[key]


def common_prefix_len(a: Tensor, b: Tensor) -> int:
    """Number of leading rows two row matrices share."""
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).any(dim=1).nonzero()
    return int(differ[0, 0]) if differ.numel() else n


class History:
    """One conversation's voice and turns, its context budget and its rows."""

    def __init__(
        self,
        builder: PromptBuilder,
        prefixes: PrefixRows,
        *,
        voice: Voice | None,
        max_rows: int,
        trim_target: float,
    ) -> None:
        self.builder = builder
        self.prefixes = prefixes
        self.voice = voice  # applies from the next turn
        self.max_rows = max_rows
        self.trim_target = trim_target
        self.turns: list[HistoryTurn] = []
        self._head_len: dict[bool, int] = {}  # rows of the assistant prefix (first turn or not)
        self.trims = 0  # how many times old turns were dropped

    # -- turns ----------------------------------------------------------------------------------
    def add_user(self, text: str, codes: Tensor | None) -> None:
        """Append a user turn; its rows are built now so bad input fails here, not next turn."""
        turn = HistoryTurn(USER, text, codes)
        turn.rows(self.builder, first=not self.turns)
        self.turns.append(turn)

    def add_assistant(self, turn_id: int, text: str, text_ids: list[int], frames: Tensor) -> None:
        self.turns.append(HistoryTurn(ASSISTANT, text, frames, list(text_ids), turn_id))

    def replace_assistant(
        self, turn_id: int, text: str, text_ids: list[int], frames: Tensor
    ) -> bool:
        """Rewrite assistant turn `turn_id` as heard (a late cut), wherever it is: the next
        turn's KV sync cuts the cache there. False if the turn is gone (trimmed)."""
        i = self._assistant_index(turn_id)
        if i is None:
            return False
        self.turns[i] = HistoryTurn(ASSISTANT, text, frames, list(text_ids), turn_id)
        return True

    def remove_assistant(self, turn_id: int) -> bool:
        """Drop assistant turn `turn_id` (nothing of it was heard); False if it is gone."""
        i = self._assistant_index(turn_id)
        if i is None:
            return False
        del self.turns[i]
        return True

    def _assistant_index(self, turn_id: int) -> int | None:
        return next((i for i in range(len(self.turns) - 1, -1, -1)
                     if self.turns[i].role == ASSISTANT and self.turns[i].turn_id == turn_id), None)

    def view(self) -> tuple[TurnView, ...]:
        return tuple(t.view() for t in self.turns)

    def past(self) -> tuple[PastTurn, ...]:
        return tuple(t.past() for t in self.turns)

    def restore(self, turns: Sequence[PastTurn]) -> None:
        """Start from turns another engine had (`Conversation.history`), each checked and laid
        out now, so a history this model cannot use is refused here.

        Raises:
            TypeError, ValueError: a turn that is not a PastTurn, an unknown role, codes or
                text ids outside the model's ranges.
        """
        restored: list[HistoryTurn] = []
        for i, past in enumerate(turns):
            if not isinstance(past, PastTurn):
                raise TypeError(f"history[{i}] must be a PastTurn, got {type(past).__name__}")
            if past.role not in (USER, ASSISTANT):
                raise ValueError(f"history[{i}].role must be 'user' or 'assistant', "
                                 f"got {past.role!r:.40}")
            codes = past.codes
            if codes is not None and (not isinstance(codes, Tensor) or codes.dim() != 2
                                      or codes.shape[1] != NUM_CODEBOOKS):
                raise ValueError(f"history[{i}].codes must be a [frames, {NUM_CODEBOOKS}] tensor")
            if codes is not None:
                codes = codes.to("cpu", torch.long)
            if past.role == ASSISTANT:
                turn = HistoryTurn(ASSISTANT, past.text, codes, list(past.text_ids))
            else:
                turn = HistoryTurn(USER, past.text, codes)
            turn.rows(self.builder, first=i == 0)  # raises ValueError for unusable ids/codes
            restored.append(turn)
        self.turns = restored

    # -- rows -----------------------------------------------------------------------------------
    def prefix(self) -> Tensor:
        """The system+voice prefix rows of the current voice."""
        return self.prefixes.rows(self.voice)

    def prefix_len(self) -> int:
        return int(self.prefix().shape[0])

    def rows(self) -> Tensor:
        """The whole history: prefix, then every turn."""
        parts = [self.prefix()]
        parts += [t.rows(self.builder, first=i == 0) for i, t in enumerate(self.turns)]
        return torch.cat(parts)

    def _turn_lens(self) -> int:
        return sum(int(t.rows(self.builder, first=i == 0).shape[0]) for i, t in enumerate(self.turns))

    def begin_assistant(self, reserve_rows: int) -> Tensor:
        """Rows the KV must hold before the next assistant turn's lead: history + its head.

        Trims the oldest turns when history + `reserve_rows` (lead, frame cap, EOS) exceeds the
        budget, down to `trim_target` of it, never the voice block or the newest user turn.

        Raises:
            ContextOverflowError: even without old turns the turn cannot fit.
        """
        prefix_len = self.prefix_len()

        def total() -> int:
            head = self.builder.assistant_prefix_rows(first=not self.turns).shape[0]
            return prefix_len + self._turn_lens() + int(head) + reserve_rows

        if total() > self.max_rows:
            last_assistant = max(
                (i for i, t in enumerate(self.turns) if t.role == ASSISTANT), default=-1
            )
            # Keep the user turn(s) this turn answers, down to the newest one: unanswered user
            # turns pile up when replies are cancelled before any audio was heard.
            droppable = max(last_assistant + 1, len(self.turns) - 1)
            target = self.trim_target * self.max_rows
            kept = list(self.turns)
            dropped = 0
            while dropped < droppable and total() > target:
                self.turns.pop(0)
                dropped += 1
            if total() > self.max_rows:
                self.turns[:] = kept  # a turn that cannot fit anyway costs no history
                raise ContextOverflowError(
                    f"the turn needs {total()} context rows (voice block, current user turn and "
                    f"frame cap) but max_context_rows is {self.max_rows}"
                )
            self.trims += int(dropped > 0)
        head = self.builder.assistant_prefix_rows(first=not self.turns)
        return torch.cat([self.rows(), head])

    def rows_needed(self, reserve_rows: int) -> int:
        """Most KV rows the next assistant turn can hold (history, its head and `reserve_rows`),
        without building or trimming anything: what the engine keeps free for the turn."""
        first = not self.turns
        if first not in self._head_len:
            self._head_len[first] = int(self.builder.assistant_prefix_rows(first=first).shape[0])
        total = self.prefix_len() + self._turn_lens() + self._head_len[first] + reserve_rows
        return min(total, self.max_rows)
