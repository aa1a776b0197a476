"""Conversation: one room's context (voice, turns as rows, KV handle, context budget).

The conversation keeps the *canonical* history: the system+voice prefix and every turn in the
training layout, built from what each turn really was (for an interrupted assistant turn: what
the listener heard). The KV cache is only a cache of a prefix of those rows. Before each assistant
turn the canonical rows are compared with the rows in the KV cache; the cache is cut at the first
difference and only the rest is prefilled. This one rule covers every case:

- a normal next turn: the cache holds all history, only the new user turn and prefix are new;
- after an interruption: the cache is cut where the heard turn differs from what was fed;
- after trimming the oldest turns (context budget): the cache keeps the system+voice prefix and
  everything after it is prefilled again (a rebuild at a turn boundary);
- after a voice change: the cache keeps only the system block;
- after the KV was evicted (idle conversation, pool full): everything is prefilled again.

The system+voice prefix rows are built once per voice (`PrefixCache`) and, inside a conversation,
stay in the cache across turns, trims and rebuilds. Their KV is computed once per voice too: when
a conversation's cache lacks its prefix (new conversation, eviction, voice change) the engine
passes a prefilled prefix sequence to `sync_kv`, which forks it instead of prefilling it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from core.errors import ContextOverflowError

if TYPE_CHECKING:
    from core.engine.stream import TurnStream
    from core.model.kv_cache import KVPool
    from core.model.sampling import SamplingParams
    from core.prompt import PromptBuilder
    from core.voices import Voice

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
    """One turn as the context holds it; rows are built on demand (they depend on `first`)."""

    role: str
    text: str
    codes: Tensor | None = None  # Long[F, 16]: user speech codes or assistant frames
    text_ids: list[int] | None = None  # assistant: the text ids laid out in its rows
    turn_id: int | None = None  # assistant: the TurnStream it came from
    _rows: dict[bool, Tensor] = field(default_factory=dict)

    def rows(self, builder: PromptBuilder, *, first: bool) -> Tensor:
        if first not in self._rows:
            if self.role == USER:
                self._rows[first] = builder.user_rows(self.text, self.codes, first=first)
            else:
                codes = self.codes if self.codes is not None else _no_frames(builder)
                self._rows[first] = torch.cat([
                    builder.assistant_prefix_rows(first=first),
                    builder.assistant_turn_rows(self.text_ids or [], codes),
                ])
        return self._rows[first]

    def view(self) -> TurnView:
        return TurnView(self.role, self.text, 0 if self.codes is None else int(self.codes.shape[0]))


def _no_frames(builder: PromptBuilder) -> Tensor:
    return torch.zeros(0, getattr(builder, "rvq", 16), dtype=torch.long)


class PrefixSource(Protocol):
    """A pool sequence whose first rows are `rows` (the engine's prefix KV of one voice)."""

    rows: Tensor
    seq_id: int


class PrefixCache:
    """System + voice-block rows, built once per voice (key: the voice's content hash).

    Bounded (least recently used voices go first) so a long-running server that sees many
    voices does not grow without end; conversations keep their own reference to the rows.
    """

    def __init__(self, builder: PromptBuilder, max_voices: int = 1024) -> None:
        self._builder = builder
        self._rows: OrderedDict[str | None, Tensor] = OrderedDict()
        self._max_voices = max_voices
        self._lock = threading.Lock()

    def system_len(self) -> int:
        return int(self.rows(None).shape[0])

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


class ConversationContext:
    """A conversation's engine-side state. Only the engine thread mutates it."""

    def __init__(
        self,
        builder: PromptBuilder,
        prefixes: PrefixCache,
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
        self.seq_id: int | None = None
        self._kv_rows: list[Tensor] = []  # rows in the KV cache, in order
        self.kv_len = 0
        self.kv_evicted = False  # the cache was evicted and not rebuilt yet (metrics)
        self._head_len: dict[bool, int] = {}  # rows of the assistant prefix (first turn or not)
        self.trims = 0  # how many times old turns were dropped (tests, metrics)

    # -- history ------------------------------------------------------------------------------
    def add_user(self, text: str, codes: Tensor | None) -> None:
        """Append a user turn; its rows are built now so bad input fails here, not next turn."""
        turn = HistoryTurn(USER, text, codes)
        turn.rows(self.builder, first=not self.turns)
        self.turns.append(turn)

    def add_assistant(
        self, turn_id: int, text: str, text_ids: list[int], frames: Tensor
    ) -> None:
        self.turns.append(HistoryTurn(ASSISTANT, text, frames, list(text_ids), turn_id))

    def replace_assistant(
        self, turn_id: int, text: str, text_ids: list[int], frames: Tensor
    ) -> bool:
        """Rewrite assistant turn `turn_id` as heard (a late cancel), wherever it is: the next
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

    def history_rows(self) -> Tensor:
        parts = [self.prefixes.rows(self.voice)]
        parts += [t.rows(self.builder, first=i == 0) for i, t in enumerate(self.turns)]
        return torch.cat(parts)

    def _turn_lens(self) -> int:
        return sum(int(t.rows(self.builder, first=i == 0).shape[0]) for i, t in enumerate(self.turns))

    # -- the next assistant turn ------------------------------------------------------------
    def begin_assistant(self, reserve_rows: int) -> Tensor:
        """Rows the KV must hold before this turn's lead: history + assistant prefix.

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
        return torch.cat([self.history_rows(), head])

    def rows_needed(self, reserve_rows: int) -> int:
        """Most KV rows the next assistant turn can hold (history, its head and `reserve_rows`),
        without building or trimming anything: what the engine keeps free for the turn."""
        first = not self.turns
        if first not in self._head_len:
            self._head_len[first] = int(self.builder.assistant_prefix_rows(first=first).shape[0])
        total = self.prefix_len() + self._turn_lens() + self._head_len[first] + reserve_rows
        return min(total, self.max_rows)

    # -- KV bookkeeping (the engine feeds rows; the context remembers which) ------------------
    def prefix_len(self) -> int:
        """Rows of the system+voice prefix of the current voice."""
        return int(self.prefixes.rows(self.voice).shape[0])

    def holds_own_prefix(self) -> bool:
        """True when the KV cache holds the current voice's system+voice prefix."""
        return self.holds_prefix(self.prefixes.rows(self.voice), self.prefix_len())

    def holds_prefix(self, target: Tensor, length: int) -> bool:
        """True when the KV cache already holds the first `length` rows of `target`."""
        if self.seq_id is None or self.kv_len < length:
            return False
        return common_prefix_len(self._kv_head(length), target[:length]) == length

    def _kv_head(self, length: int) -> Tensor:
        """The first `length` cached rows, without concatenating the rest of the cache."""
        parts, n = [], 0
        for part in self._kv_rows:
            if n >= length:
                break
            parts.append(part[: length - n])
            n += int(part.shape[0])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def sync_kv(self, pool: KVPool, target: Tensor, prefix: PrefixSource | None = None) -> Tensor:
        """Cut the KV cache at its first difference with `target`; return the rows to prefill.

        With a `prefix` whose rows start `target` and that covers more than the cache keeps,
        the cache becomes a fork of it (its rows are not computed again).
        """
        self.kv_evicted = False  # rebuilt from here on
        if prefix is not None:
            n = int(prefix.rows.shape[0])
            if n <= target.shape[0] and not self.holds_prefix(target, n) and bool(
                (prefix.rows == target[:n]).all()
            ):
                try:
                    seq = pool.fork(prefix.seq_id, n)
                except ContextOverflowError:  # no block for the copy (KVPoolExhausted): prefill
                    pass
                else:
                    self.release_kv(pool)
                    self.seq_id, self._kv_rows, self.kv_len = seq, [target[:n]], n
                    return target[n:]
        if self.seq_id is None:
            self.seq_id = pool.new_sequence()
            self._kv_rows, self.kv_len = [], 0
        cached = torch.cat(self._kv_rows) if self._kv_rows else target[:0]
        keep = common_prefix_len(cached, target)
        if keep < self.kv_len:
            pool.truncate(self.seq_id, keep)
        self._kv_rows, self.kv_len = [cached[:keep]], keep  # one tensor again (turn boundary)
        return target[keep:]

    def kv_appended(self, rows: Tensor) -> None:
        self._kv_rows.append(rows.detach().to("cpu"))
        self.kv_len += int(rows.shape[0])

    def kv_truncate(self, pool: KVPool, length: int) -> None:
        """Roll the cache back to `length` rows (e.g. a failed step)."""
        assert self.seq_id is not None and 0 <= length <= self.kv_len, "bad KV rollback"
        pool.truncate(self.seq_id, length)
        cached = torch.cat(self._kv_rows) if self._kv_rows else None
        self._kv_rows = [] if cached is None else [cached[:length]]
        self.kv_len = length

    def release_kv(self, pool: KVPool, *, evicted: bool = False) -> None:
        """Give the cache back (evicted, closed or replaced); the rows can always be prefilled
        again."""
        if self.seq_id is not None:
            pool.free(self.seq_id)
            self.kv_evicted = evicted
        self.seq_id, self._kv_rows, self.kv_len = None, [], 0

    def kv_rows(self) -> Tensor | None:
        return torch.cat(self._kv_rows) if self._kv_rows else None


class _ConversationLink(Protocol):
    def _speak(self, conv: Conversation) -> TurnStream: ...

    async def _add_user_turn(
        self, conv: Conversation, text: str, audio: Any, sample_rate: int | None
    ) -> None: ...

    def _set_voice(self, conv: Conversation, voice: Voice | None) -> None: ...

    def _close_conversation(self, conv: Conversation) -> None: ...


class Conversation:
    """One room or call: a voice, sampling settings and the dialogue so far.

    Create with `engine.conversation(voice=..., sampling=...)`. Methods may be called from any
    asyncio loop; the state lives on the engine thread.
    """

    def __init__(
        self,
        link: _ConversationLink,
        conv_id: int,
        context: ConversationContext,
        sampling: SamplingParams,
    ) -> None:
        self._link = link
        self.conv_id = conv_id
        self.context = context  # engine thread only
        self.sampling = sampling
        self._voice = context.voice
        self._turns: tuple[TurnView, ...] = ()
        self.closed = False

    @property
    def voice(self) -> Voice | None:
        """The voice of the next turn."""
        return self._voice

    def set_voice(self, voice: Voice | None) -> None:
        """Change the voice; applies from the next turn (the history is prefilled again)."""
        self._link._set_voice(self, voice)
        self._voice = voice

    @property
    def turns(self) -> tuple[TurnView, ...]:
        """The turns in the context now (oldest may have been trimmed)."""
        return self._turns

    def _publish(self) -> None:
        """Engine thread: refresh the read-only view (an atomic tuple swap)."""
        self._turns = self.context.view()

    def speak(self) -> TurnStream:
        """Start (or queue behind the active one) an assistant turn.

        Raises:
            AdmissionError: `max_streams` conversations are already speaking.
            EngineClosed: the engine or this conversation was closed.
        """
        return self._link._speak(self)

    async def add_user_turn(
        self, text: str = "", audio: Any = None, sample_rate: int | None = None
    ) -> None:
        """Add what the user said: text, and their speech when given (int16 bytes or an array
        with `sample_rate`, or an audio file), encoded on the engine thread.

        The turn goes after the turns already queued on this conversation, so this returns
        once the active assistant turn (if any) has ended and the user turn is in the context.

        Raises:
            ValueError: neither text nor audio (InvalidAudioError for unreadable audio).
            TextTooLongError: more than `max_text_chars` characters.
        """
        await self._link._add_user_turn(self, text, audio, sample_rate)

    def close(self) -> None:
        """Cancel this conversation's turns and free its cache (idempotent)."""
        if not self.closed:
            self.closed = True
            self._link._close_conversation(self)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Conversation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
