"""Chat-template rows for MOSS-TTS-Realtime: every row is one text id plus 16 audio codes.

Template variant: the TRAINING layout (`finetuning/dataset.py` upstream), chosen because it is what
the weights saw. The system block (and the voice block) end with `<|im_end|>\\n`; the first turn
after them opens with `<|im_start|>role\\n`, every later turn with `<|im_end|>\\n<|im_start|>role\\n`.
The streaming code paths upstream (`make_user_prompt`, app.py) put `<|im_end|>\\n` before the first
user turn as well, doubling it after the system/voice block; we do not. The other deliberate
differences from upstream's streaming rows, all tested against the conformance pack:

* `assistant_turn_rows` rebuilds an assistant turn in the training layout, ending with its EOS
  row; upstream never feeds the EOS frame back, so its cache lacks that row.
* User text is stripped of surrounding whitespace and tokenized on its own (upstream tokenizes
  the prefix, text and pads as one string; they differ only for text starting with a newline).
* A user turn whose text has more tokens than its audio frames + 13: upstream's
  `make_user_prompt` then adds no text-pad rows and lets the audio EOS row land inside the text.
  Here the audio block is right-aligned so that its EOS row is the block's last row, as in every
  training turn; the text then leads the audio by more than 12 rows (such audio cannot be the
  speech of that text anyway).
* A user turn without audio uses app.py's text-only layout: the text rows, all audio columns pad.
* The assistant prefill always holds min(12, L) text ids, BOS on the last (`prefill_rows`, and so
  `generate.py` and the engine's turns). Upstream's `end_text()` prefills ALL pending ids when it
  has not prefilled yet: fewer than 12 for short text (the same rows as ours), but more than 12
  when its segmenting `push_text` buffered a long fragment without a break point, so its BOS then
  lands later than in any training turn. Ours keeps the training lead of 12 at every text length.

Delay layout of a turn with text ids t[0..L) and audio frames a[0..n) (`DELAY` = 12): row r holds
t[r] (text pad once r >= L); BOS sits on row min(L, 12) - 1, frame a[j] on the row after BOS + j,
EOS on the row after the last frame. Streaming produces the same rows: `prefill_rows` (the first
min(12, L) text ids, BOS on the last), then one `step_row(text, previous frame)` per frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from core.errors import CheckpointError, InvalidAudioError
from core.text import encode_text

DELAY = 12  # text rows ahead of audio: BOS on the 12th assistant text row
SYSTEM_PROMPT = (
    "You are a highly expressive text-to-speech (TTS) engine developed by Mosi Intelligence. \n"
    "You possess natural language understanding, emotional modeling, and multi-style speech "
    "generation capabilities, allowing you to generate the corresponding speech based on the text "
    "given in the assistant."
)
VOICE_PROMPT = "The assistant section should be synthesized using the following voice timbre:"
_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|audio_pad|>", "<|text_pad|>")


class _SpecialIdsConfig(Protocol):
    text_pad_id: int
    audio_pad_text_id: int
    audio_pad_code: int
    audio_bos_code: int
    audio_eos_code: int
    rvq: int


@dataclass(frozen=True, slots=True)
class TokenIds:
    """The special ids the rows are built from: text specials from the tokenizer, audio from config."""

    im_start: int
    im_end: int
    endoftext: int
    audio_pad_text: int  # `<|audio_pad|>`: text id of rows that carry reference-voice codes
    text_pad: int  # `<|text_pad|>`: text id once the text has run out
    newline: tuple[int, ...]  # "\n" tokenized, never hard-coded
    audio_pad: int = 1024
    audio_bos: int = 1025
    audio_eos: int = 1026

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, config: _SpecialIdsConfig) -> TokenIds:
        """Read the specials from the tokenizer and check them against config.json.

        Raises:
            CheckpointError: a special token is missing or not a single id, or the config's
                `text_pad` / `reference_audio_pad` disagree with the tokenizer.
        """
        found: dict[str, int] = {}
        for name in _SPECIALS:
            ids = tokenizer.encode(name, add_special_tokens=False)
            if len(ids) != 1 or tokenizer.convert_tokens_to_ids(name) != ids[0]:
                raise CheckpointError(f"tokenizer has no single special token {name} (got {ids})")
            found[name] = int(ids[0])
        for field, name in (
            ("text_pad_id", "<|text_pad|>"),
            ("audio_pad_text_id", "<|audio_pad|>"),
        ):
            if int(getattr(config, field)) != found[name]:
                raise CheckpointError(
                    f"config {field}={getattr(config, field)} but the tokenizer has {name}="
                    f"{found[name]}: tokenizer and model checkpoint do not belong together"
                )
        vocab = getattr(config, "text_vocab_size", None)
        if vocab is not None and max(found.values()) >= vocab:
            raise CheckpointError(
                f"special token ids {found} exceed the model's text vocab {vocab}"
            )
        newline = tuple(encode_text(tokenizer, "\n"))
        if not newline:
            raise CheckpointError("tokenizer encodes a newline to no ids")
        return cls(
            im_start=found["<|im_start|>"],
            im_end=found["<|im_end|>"],
            endoftext=found["<|endoftext|>"],
            audio_pad_text=found["<|audio_pad|>"],
            text_pad=found["<|text_pad|>"],
            newline=newline,
            audio_pad=int(config.audio_pad_code),
            audio_bos=int(config.audio_bos_code),
            audio_eos=int(config.audio_eos_code),
        )


class PromptBuilder:
    """Builds the `Long[T, 1 + rvq]` CPU rows of each prompt part; stateless after construction."""

    def __init__(self, tokenizer: Any, ids: TokenIds, rvq: int = 16) -> None:
        if rvq <= 0:
            raise ValueError(f"rvq must be positive, got {rvq}")
        self.tokenizer = tokenizer
        self.ids = ids
        self.rvq = rvq
        self._vocab = len(tokenizer)
        self._system = self._text_rows(
            [ids.im_start, *self._encode("system\n" + SYSTEM_PROMPT), ids.im_end, *ids.newline]
        )
        self._voice_head = [ids.im_start, *self._encode("context\n" + VOICE_PROMPT)]

    # ---- prompt blocks -------------------------------------------------------------------------

    def system_rows(self) -> torch.Tensor:
        """The TTS system block, audio columns pad."""
        return self._system.clone()

    def voice_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """The voice-clone block: one `<|audio_pad|>` row per reference frame, carrying its codes."""
        codes = self._check_codes(codes, "voice codes")
        if codes.shape[0] == 0:
            raise InvalidAudioError("voice codes have no frames")
        head = self._text_rows(self._voice_head)
        body = self._text_rows([self.ids.audio_pad_text] * codes.shape[0])
        body[:, 1:] = codes
        return torch.cat([head, body, self._text_rows([self.ids.im_end, *self.ids.newline])])

    def user_rows(
        self, text: str, audio_codes: torch.Tensor | None = None, *, first: bool
    ) -> torch.Tensor:
        """A user turn: its text, and the user's audio codes in the delay layout when given.

        `first` is true for the first turn after the system/voice block (no leading `<|im_end|>`).
        """
        if not isinstance(text, str):
            raise TypeError(f"user text must be str, got {type(text).__name__}")
        prefix = self._turn_prefix("user", first)
        text_ids = self._encode(text.strip())
        if audio_codes is not None:
            audio_codes = self._check_codes(audio_codes, "user audio codes")
        if audio_codes is None or audio_codes.shape[0] == 0:
            if not text_ids:
                raise ValueError("a user turn needs text or audio")
            return self._text_rows(prefix + text_ids)
        n = audio_codes.shape[0]
        bos = max(min(len(text_ids), DELAY) - 1, len(text_ids) - n - 2)  # long text: right-aligned
        return self._delay_block(prefix, text_ids, audio_codes, bos)

    def assistant_prefix_rows(self, *, first: bool) -> torch.Tensor:
        """`<|im_start|>assistant\\n`, preceded by `<|im_end|>\\n` unless it opens the dialogue."""
        return self._text_rows(self._turn_prefix("assistant", first))

    # ---- assistant streaming -------------------------------------------------------------------

    def prefill_rows(self, text_ids: Sequence[int]) -> torch.Tensor:
        """The first min(12, L) assistant text rows, BOS on codebook 0 of the last one.

        Call it once 12 ids are known or the text has ended: with fewer ids BOS comes early,
        which is right only when they are the whole text. Empty text gets one `<|text_pad|>` row
        carrying BOS, the same row `assistant_turn_rows` uses, so a rebuilt turn always equals
        what was streamed.
        """
        ids = self._check_ids(text_ids)[:DELAY] or [self.ids.text_pad]
        rows = self._text_rows(ids)
        rows[-1, 1] = self.ids.audio_bos
        return rows

    def step_row(self, text_id: int | None, frame: torch.Tensor) -> torch.Tensor:
        """One decode row `[text id (text pad if None), previous frame's codes]`, shape [1, 17]."""
        text = self.ids.text_pad if text_id is None else self._check_ids([text_id])[0]
        if not isinstance(frame, torch.Tensor):
            raise TypeError(f"frame must be a torch.Tensor, got {type(frame).__name__}")
        frame = self._check_codes(frame.unsqueeze(0) if frame.dim() == 1 else frame, "frame", True)
        if frame.shape[0] != 1:
            raise InvalidAudioError(f"step_row takes one frame, got {tuple(frame.shape)}")
        row = self._text_rows([text])
        row[0, 1:] = frame[0]
        return row

    def assistant_turn_rows(self, text_ids: Sequence[int], frames: torch.Tensor) -> torch.Tensor:
        """A finished or truncated assistant turn after its prefix, in the training layout.

        Equals `prefill_rows(text_ids)` + one `step_row` per frame fed back + the EOS row
        `[text or pad, EOS]`. Text beyond the EOS row (never spoken) is dropped.
        """
        ids = self._check_ids(text_ids) or [self.ids.text_pad]
        frames = self._check_codes(frames, "assistant frames", generated=True)
        bos = min(len(ids), DELAY) - 1
        return self._delay_block([], ids[: bos + frames.shape[0] + 2], frames, bos)

    # ---- helpers -------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def _turn_prefix(self, role: str, first: bool) -> list[int]:
        lead = [] if first else [self.ids.im_end, *self.ids.newline]
        return [*lead, self.ids.im_start, *self._encode(role + "\n")]

    def _text_rows(self, text_ids: Sequence[int]) -> torch.Tensor:
        rows = torch.full((len(text_ids), 1 + self.rvq), self.ids.audio_pad, dtype=torch.long)
        rows[:, 0] = torch.tensor(list(text_ids), dtype=torch.long)
        return rows

    def _delay_block(
        self, prefix: list[int], text_ids: list[int], codes: torch.Tensor, bos: int
    ) -> torch.Tensor:
        """Prefix rows, then text rows padded to BOS + frames + EOS; `bos` counts from the text."""
        n_rows = max(len(text_ids), bos + codes.shape[0] + 2)
        text = text_ids + [self.ids.text_pad] * (n_rows - len(text_ids))
        rows = self._text_rows(prefix + text)
        b = len(prefix) + bos
        assert b >= 0, "BOS must land inside the block"
        rows[b, 1] = self.ids.audio_bos
        rows[b + 1 : b + 1 + codes.shape[0], 1:] = codes
        rows[b + 1 + codes.shape[0], 1] = self.ids.audio_eos
        return rows

    def _check_ids(self, text_ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in text_ids]
        bad = [i for i in ids if not 0 <= i < self._vocab]
        if bad:
            raise ValueError(f"text ids outside the tokenizer's {self._vocab} tokens: {bad[:5]}")
        return ids

    def _check_codes(self, codes: torch.Tensor, what: str, generated: bool = False) -> torch.Tensor:
        """Codec codes are in [0, pad); generated frames may hold any audio id the model can emit
        (a sampled special on codebooks 1-15 is fed back as upstream does), EOS included."""
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(codes).__name__}")
        if codes.dim() != 2 or codes.shape[1] != self.rvq:
            raise InvalidAudioError(
                f"{what} must be [frames, {self.rvq}], got {tuple(codes.shape)}"
            )
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise InvalidAudioError(f"{what} must be integer codes, got {codes.dtype}")
        codes = codes.to("cpu", torch.long)
        limit = self.ids.audio_eos + 1 if generated else self.ids.audio_pad
        if codes.numel() and not bool(((codes >= 0) & (codes < limit)).all()):
            raise InvalidAudioError(f"{what} must be audio ids in [0, {limit})")
        return codes
