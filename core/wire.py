"""Wire protocol version 1 (docs/PROTOCOL.md): the message pieces both ends build and read.

`core.server` and `core.remote` share these helpers, so the two sides agree on every field by
construction: error objects, sampling, history snapshots, chunks, and the field checks that
turn a malformed message into one `ProtocolError` instead of a crash.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.errors import (
    AdmissionError,
    CapacityError,
    ContextOverflowError,
    EngineClosed,
    InvalidAudioError,
    ProtocolError,
    StreamCancelled,
    StreamFailed,
    TextTooLongError,
)
from core.history import TurnView
from core.timings import WordTiming
from core.values import PastTurn, SamplingParams

VERSION = 1
SAMPLE_RATE = 24000
CODEBOOKS = 16
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # idle socket, engine closed
CLOSE_POLICY = 1008  # protocol violation
CLOSE_TOO_BIG = 1009
CLOSE_TRY_LATER = 1013  # conversation refused (AdmissionError)
CLOSE_UNAUTHORIZED = 4401
CLOSE_SUPERSEDED = 4409  # a newer socket of the same session took over

# What an error object's `type` may name; the receiver raises the same class.
ERROR_CLASSES: dict[str, type[Exception]] = {cls.__name__: cls for cls in (
    AdmissionError, CapacityError, ContextOverflowError, StreamFailed, StreamCancelled,
    EngineClosed, TextTooLongError, InvalidAudioError, ProtocolError, ValueError, TypeError)}

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def error_object(exc: BaseException) -> dict[str, str]:
    """`{"type", "message"}` naming the nearest class the protocol knows (else StreamFailed)."""
    name = next((c.__name__ for c in type(exc).__mro__ if ERROR_CLASSES.get(c.__name__) is c),
                "StreamFailed")
    return {"type": name, "message": str(exc) or type(exc).__name__}


def error_from(obj: object) -> Exception:
    """The exception an error object describes (StreamFailed for anything unknown)."""
    if not isinstance(obj, dict):
        return StreamFailed(f"the server sent a malformed error: {obj!r:.200}")
    cls = ERROR_CLASSES.get(str(obj.get("type")), StreamFailed)
    return cls(str(obj.get("message", "")))


def dumps(message: dict[str, Any]) -> str:
    """One JSON text frame (no NaN/inf: the other end may be strict)."""
    return json.dumps(message, allow_nan=False, separators=(",", ":"))


def loads(text: str) -> dict[str, Any]:
    """Parse one text frame into a message with a string `type`, or raise ProtocolError."""
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("a message must be a JSON object with a string 'type'")
    return obj


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


# -- field checks -----------------------------------------------------------------------------
def get_int(msg: dict[str, Any], name: str, *, low: int = 0, high: int = 2**53,
            optional: bool = False) -> int | None:
    """An int field in [low, high] (bools refused); None only when `optional` and null/absent."""
    value = msg.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"'{name}' must be an int in [{low}, {high}], got {value!r:.80}")
    return value


def get_str(msg: dict[str, Any], name: str, *, max_len: int, optional: bool = False) -> str | None:
    value = msg.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"'{name}' must be a string of at most {max_len} characters")
    return value


def get_seconds(msg: dict[str, Any], name: str, *, optional: bool = False) -> float | None:
    """A finite number >= 0 (seconds)."""
    value = msg.get(name)
    if value is None and optional:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value < 0 or abs(value) > 1e12):
        raise ProtocolError(f"'{name}' must be a finite number of seconds >= 0, got {value!r:.80}")
    return float(value)


def get_list(msg: dict[str, Any], name: str, *, max_len: int) -> list[Any]:
    value = msg.get(name)
    if not isinstance(value, list) or len(value) > max_len:
        raise ProtocolError(f"'{name}' must be a list of at most {max_len} items")
    return value


# -- values -----------------------------------------------------------------------------------
def sampling_to_wire(sampling: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(sampling)


def sampling_from_wire(obj: object) -> SamplingParams:
    """A `SamplingParams` from its fields; anything unusable is a ProtocolError."""
    if not isinstance(obj, dict) or not set(obj) <= _SAMPLING_FIELDS:
        raise ProtocolError(f"'sampling' must be an object with fields of SamplingParams "
                            f"{sorted(_SAMPLING_FIELDS)}")
    for name, value in obj.items():
        if name == "seed" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"sampling.{name} must be a number, got {value!r:.80}")
    try:
        return SamplingParams(**obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"'sampling' is unusable: {exc}") from None


def turns_from_wire(items: object) -> tuple[tuple[TurnView, int], ...]:
    """A `turns` message's turns, each with the ref of the `past` message that carried it."""
    if not isinstance(items, list):
        raise ProtocolError("'turns' must be a list")
    try:
        return tuple((TurnView(str(t["role"]), str(t["text"]), int(t["frames"])), int(t["ref"]))
                     for t in items)
    except (TypeError, KeyError, ValueError) as exc:
        raise ProtocolError(f"malformed 'turns': {exc!r}") from None


def codes_to_wire(codes: Tensor | None) -> bytes:
    """Audio codes `[frames, 16]` as little-endian int16, row major (b"" for none)."""
    if codes is None or codes.shape[0] == 0:
        return b""
    return codes.numpy().astype("<i2").tobytes()


def codes_from_wire(data: bytes) -> Tensor:
    """Codes `[frames, 16]` from their int16 bytes (the receiver checks their range)."""
    if len(data) % (CODEBOOKS * 2):
        raise ProtocolError(f"codes need a multiple of {CODEBOOKS * 2} bytes, got {len(data)}")
    return torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.int64)).reshape(-1, CODEBOOKS)


def past_to_wire(turn: PastTurn, nbytes: int) -> dict[str, Any]:
    """One history turn's fields (its codes go in the binary frame that follows)."""
    return {"role": turn.role, "text": turn.text, "text_ids": list(turn.text_ids),
            "frames": turn.frames, "bytes": nbytes}


def past_from_wire(msg: dict[str, Any], data: bytes | None) -> PastTurn:
    try:
        ids = tuple(int(i) for i in msg["text_ids"])
        return PastTurn(str(msg["role"]), str(msg["text"]),
                        codes_from_wire(data) if data else None, ids)
    except (TypeError, KeyError, ValueError) as exc:
        raise ProtocolError(f"malformed history turn: {exc!r}") from None


def words_to_wire(words: list[WordTiming]) -> list[list[Any]]:
    return [[w.word, w.start_s, w.end_s] for w in words]


def words_from_wire(items: object) -> list[WordTiming]:
    if not isinstance(items, list):
        raise ProtocolError("'words' must be a list")
    try:
        return [WordTiming(str(w), float(s), float(e)) for w, s, e in items]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed 'words': {exc!r}") from None
