"""Light public value types: what callers name, without loading the model or the codec.

The plugins (and a future network client) build `SamplingParams`, hold `Voice`s and send
`UserTurn`s; none of that should import the sampler, the codec or the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_REPETITION_WINDOW = 256  # frames of history a sampler slot keeps (upstream default: 50)
NUM_CODEBOOKS = 16  # RVQ codebooks per audio frame (codec and model)


@dataclass(frozen=True)
class SamplingParams:
    """Per-conversation sampling settings (upstream defaults); temperature 0 = argmax."""

    temperature: float = 0.8  # below MIN_TEMPERATURE: greedy (logits / T would overflow)
    top_p: float = 0.6
    top_k: int = 30  # 0 disables top-k
    repetition_penalty: float = 1.1  # 1.0 disables the penalty
    repetition_window: int = 50
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        window = self.repetition_window
        if not isinstance(window, int) or not 1 <= window <= MAX_REPETITION_WINDOW:
            raise ValueError(
                f"repetition_window must be an int in [1, {MAX_REPETITION_WINDOW}], got {window!r}"
            )
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")


@dataclass(frozen=True)
class Voice:
    """An encoded voice prompt (`engine.load_voice`): its codes plus its identity."""

    codes: torch.Tensor = field(repr=False)  # Long[N, 16] on CPU
    key: str  # sha256 of the source content (and its declared sample rate)
    duration_s: float  # duration of the encoded frames (N * 0.08 s)

    def __post_init__(self) -> None:
        assert self.codes.dtype == torch.long and self.codes.device.type == "cpu", "codes: Long CPU"
        assert self.codes.dim() == 2 and self.codes.shape[1] == NUM_CODEBOOKS, "codes: [N, 16]"


@dataclass(frozen=True)
class UserTurn:
    """What the user said before a reply: words, and their speech when captured.

    `audio` is int16 bytes or an array (any rate given by `sample_rate`), or an audio file; it is
    checked when the turn is handed to the engine and encoded there, off the caller's loop.
    """

    text: str = ""
    audio: Any = None
    sample_rate: int | None = None


@dataclass(frozen=True)
class PastTurn:
    """One turn of a conversation as it stands in the history (as heard, for a cut reply):
    what `Engine.conversation(history=...)` needs to rebuild the conversation on another
    engine, so a call outlives the server it started on.

    `codes` are user speech codes or the assistant's frames (Long[F, 16], None for none);
    `text_ids` are the assistant's text tokens as laid out among its frames (the model's own
    ids: a turn moves between servers of the same model).
    """

    role: str  # "user" or "assistant"
    text: str
    codes: torch.Tensor | None = field(default=None, repr=False)
    text_ids: tuple[int, ...] = field(default=(), repr=False)

    @property
    def frames(self) -> int:
        return 0 if self.codes is None else int(self.codes.shape[0])
