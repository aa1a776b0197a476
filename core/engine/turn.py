"""TurnState: the engine-thread state of one assistant turn between its start and its end.

It turns the caller's text deltas into stable token ids, queues prompt rows for chunked
prefill, builds one step row per frame (a text token, or `<|text_pad|>` only after end_text: a
stream whose text runs dry waits instead of padding), and cuts generated PCM into chunks with
the words estimated to have been spoken in them.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from core.engine.config import EngineConfig
from core.engine.scheduler import ListenerClock, StreamDemand, chunk_ready
from core.engine.slots import SlotLease
from core.engine.stream import AudioChunk, TurnStream
from core.history import ASSISTANT, HistoryTurn
from core.prompt import DELAY, PromptBuilder
from core.text import IncrementalTokenizer, TextNormalizer, encode_text
from core.timings import FRAME_S, WordTimingEstimator

if TYPE_CHECKING:
    from core.engine.runner import FrameAudio


class TurnState:
    """One started turn: text in, rows to feed, frames and chunks out (engine thread only)."""

    def __init__(self, stream: TurnStream, conv_id: int, lease: SlotLease, *,
                 builder: PromptBuilder, tokenizer: object, config: EngineConfig,
                 sample_rate: int, now: float) -> None:
        self.stream, self.conv_id, self.lease = stream, conv_id, lease
        self.builder, self.tokenizer, self.config = builder, tokenizer, config
        self.sample_rate = sample_rate
        self.decoding = False  # a frame was sampled: one step row per tick from now on
        self.done = False
        self.rows_pending: Tensor | None = None
        # (prefix key, history rows) while the voice prefix is being prefilled: nothing of
        # this turn is scheduled until the loop forks the prefix and queues the history.
        self.prefix_wait: tuple[str | None, Tensor] | None = None
        self.lead_queued = False
        self.incremental = IncrementalTokenizer(tokenizer)
        # The text as the model reads it (invisible/control characters and lone surrogates
        # dropped): what word timings and the history keep, and what decides `has_speech`.
        self.normalizer = TextNormalizer()
        self.spoken: list[str] = []
        self.ids: deque[int] = deque()
        self.fed_ids: list[int] = []
        self.text_flushed = False
        self.has_speech = False  # a non-whitespace character arrived: the lead may start
        self.frames: list[Tensor] = []
        self._pcm: list[bytes] = []  # int16 PCM of the frames not yet in a chunk
        self._energy: list[float] = []  # and their RMS
        self.emitted_frames = 0
        self.words = WordTimingEstimator(frame_s=FRAME_S)
        self.clock = ListenerClock()
        self.starved = False
        self.started_at = now
        self.text_at = now  # last time text (or end_text) arrived
        self.lead_ready_at: float | None = None
        self.underruns = 0  # not yet reported to the metrics
        self.sampler_started = False
        self.kv_blocks = 0  # most pool blocks its sequence may hold (kept free at admission)
        self.rebuild = False  # its history's KV had been evicted and is prefilled again
        self.played_s: float | None = None  # what the listener heard, once told (mark_played)

    # -- text ---------------------------------------------------------------------------------
    def ingest_text(self, now: float) -> None:
        """Pull new deltas from the stream; queue the lead rows once 12 ids (or all) are known."""
        delta, ended = self.stream.take_text()
        if delta or (ended and not self.text_flushed):
            self.text_at = now
        if delta:
            self.ids.extend(self.incremental.push(delta))  # normalises the same way itself
            self._take_text(self.normalizer.push(delta))
        if ended and not self.text_flushed:
            self.ids.extend(self.incremental.flush())
            self._take_text(self.normalizer.flush())
            self.words.end_text()
            self.text_flushed = True
        if not self.decoding and not self.lead_queued and self.has_speech:
            if len(self.ids) >= DELAY or (self.text_flushed and self.ids):
                lead = [self.ids.popleft() for _ in range(min(DELAY, len(self.ids)))]
                self.fed_ids.extend(lead)
                self.queue_rows(self.builder.prefill_rows(lead))
                self.lead_queued = True
                self.lead_ready_at = now

    def _take_text(self, text: str) -> None:
        """Normalised text for the words, the history and `has_speech` (the ids come from the
        raw deltas: a second normaliser in front of the tokenizer would hold back one more
        character per delta, ~one LLM token of first-audio latency)."""
        if text:
            self.words.push_text(text)
            self.spoken.append(text)
            self.has_speech = self.has_speech or not text.isspace()

    def waiting_for_text(self) -> bool:
        """True when only more text (or end_text) can make this turn progress."""
        if self.text_flushed:
            return False
        if not self.decoding:
            return not self.lead_queued and self.rows_pending is None
        return not self.ids

    @property
    def empty_text(self) -> bool:
        """The text ended with nothing to say (empty, or whitespace only): the turn ends at once
        without audio and adds nothing to the history."""
        return self.text_flushed and not self.lead_queued

    def queue_rows(self, rows: Tensor, *, front: bool = False) -> None:
        """Queue prompt rows to prefill (`front`: before the lead already queued)."""
        pending = self.rows_pending
        if not rows.shape[0]:
            return
        if pending is None:
            self.rows_pending = rows
        else:
            self.rows_pending = torch.cat([rows, pending] if front else [pending, rows])

    # -- scheduling ---------------------------------------------------------------------------
    def demand(self, sid: int, now: float) -> StreamDemand:
        if not self.decoding:
            if self.prefix_wait is not None:
                return StreamDemand(sid, arrival=self.started_at)
            rows = 0 if self.rows_pending is None else int(self.rows_pending.shape[0])
            return StreamDemand(sid, prefill_rows=rows, prefill_samples=self.lead_queued and rows > 0,
                                arrival=self.started_at)
        ready = bool(self.ids) or self.text_flushed
        self.starved = self.starved or not ready
        buffered = self.clock.buffered_s(now, self.pending_frames * FRAME_S)
        return StreamDemand(sid, decode=ready, buffered_s=buffered, arrival=self.started_at)

    def take_prefill(self, n: int) -> Tensor:
        assert self.rows_pending is not None and 0 < n <= self.rows_pending.shape[0]
        rows, rest = self.rows_pending[:n], self.rows_pending[n:]
        self.stream.prefilled_rows += n
        self.rows_pending = rest if rest.shape[0] else None
        return rows

    def next_text_id(self) -> int | None:
        """Consume the text column of the next decode row (None: text pad, after end_text);
        the row itself is built by `decode_rows` with the previous frame."""
        assert self.frames, "a decode step needs the previous frame"
        text_id = self.ids.popleft() if self.ids else None
        assert text_id is not None or self.text_flushed, "padding before end_text"
        if text_id is not None:
            self.fed_ids.append(text_id)
        return text_id

    # -- audio --------------------------------------------------------------------------------
    @property
    def pending_frames(self) -> int:
        return len(self.frames) - self.emitted_frames

    def accept_frame(self, codes: Tensor, audio: FrameAudio | None) -> bool:
        """Record a sampled frame; False when it ends the turn (EOS or a special code)."""
        self.decoding = True
        if audio is None:
            return False
        self.frames.append(codes)
        self._pcm.append(audio.pcm16)
        self._energy.append(audio.energy)
        return len(self.frames) < self.config.max_frames_per_turn

    @property
    def chunk_due(self) -> int:
        """Frames of the next chunk: `first_chunk_frames`, then never more than the audio already
        delivered (1, 1, 2, 4 ... up to `chunk_frames`), so a listener who started playing at the
        first chunk does not run dry while a bigger chunk fills."""
        cfg = self.config
        if self.emitted_frames == 0:
            return cfg.first_chunk_frames
        return max(1, min(cfg.chunk_frames, self.emitted_frames))

    def take_chunk(self, now: float, *, final: bool) -> AudioChunk | None:
        """A chunk when enough frames are pending, the listener would run dry waiting for more
        (`chunk_ready`), or the turn ended; else None."""
        ahead = None if self.clock.playback_end is None else self.clock.buffered_s(now)
        if not final and not chunk_ready(self.pending_frames, self.chunk_due, ahead_s=ahead,
                                         frame_s=FRAME_S):
            return None
        pcm = b"".join(self._pcm)
        energies = self._energy
        self._pcm, self._energy = [], []
        n = self.pending_frames
        start_s = self.emitted_frames * FRAME_S
        self.emitted_frames += n
        words = self.words.push_frames(len(energies), energies) if energies else []
        if final:
            words += self.words.end_audio()
        duration = len(pcm) / (2 * self.sample_rate)
        if duration > 0 and self.clock.deliver(now, duration, starved=self.starved):
            self.underruns += 1
        self.starved = False
        return AudioChunk(pcm, self.sample_rate, start_s, duration, words, final)

    # -- what the history keeps ---------------------------------------------------------------
    def heard(self, played_s: float | None) -> HistoryTurn | None:
        """The turn as the listener heard it (None: nothing was heard)."""
        turn_id = self.stream.turn_id
        n = self.emitted_frames
        if played_s is not None and played_s < n * FRAME_S:
            n = int(math.floor(played_s / FRAME_S + 1e-6))
        if n == 0:
            return None
        frames = torch.stack(self.frames[:n])
        if n == len(self.frames) and played_s is None:
            text_ids = list(self.fed_ids)
            # All text read, or (frame cap, early EOS) the ids fed so far, without the half of a
            # character whose bytes the last fed token only began.
            text = "".join(self.spoken) if not self.ids and self.text_flushed else (
                self.tokenizer.decode(text_ids).rstrip("\ufffd"))  # type: ignore[attr-defined]
            return HistoryTurn(ASSISTANT, text, frames, text_ids, turn_id)
        text = self.words.heard_text(n * FRAME_S)
        text_ids = encode_text(self.tokenizer, text.rstrip()) if text.strip() else []
        return HistoryTurn(ASSISTANT, text.rstrip(), frames, text_ids, turn_id)


def decode_rows(builder: PromptBuilder, turns: list[TurnState],
                text_ids: list[int | None]) -> tuple[Tensor, ...]:
    """This tick's decode rows, one [1, 17] view per turn: `PromptBuilder.step_row`'s layout
    ([text id, or text pad for None; the turn's previous frame]) built for every stream at once
    (a few tensor ops per tick instead of a few per stream). The frames are the model's own
    accepted output and the ids the tokenizer's, so the per-row checks of `step_row` are moot."""
    pad = builder.ids.text_pad
    rows = torch.empty(len(turns), 1 + builder.rvq, dtype=torch.long)
    rows[:, 0] = torch.tensor([pad if t is None else t for t in text_ids], dtype=torch.long)
    rows[:, 1:] = torch.stack([turn.frames[-1] for turn in turns])
    return rows.split(1)
