"""Engine errors seen through LiveKit's error types.

LiveKit retries, falls back (`tts.FallbackAdapter`) and emits `"error"` events only for `APIError`;
any other exception bypasses that machinery. Every core error is therefore mapped here, at the
plugin boundary, to an `APIStatusError` subclass whose status code says whether a retry can help.
The original core error stays reachable as `__cause__` and as `.moss_error`.
"""

from __future__ import annotations

from livekit.agents import APIError, APIStatusError

from core.errors import (
    AdmissionError,
    CheckpointError,
    ContextOverflowError,
    EngineClosed,
    InvalidAudioError,
    MossError,
    StreamCancelled,
    StreamFailed,
    TextTooLongError,
)

# (status code, retryable): 4xx are the caller's input (retrying the same text cannot help),
# 503 is a full engine (another attempt or the next TTS of a FallbackAdapter can), 499 is
# LiveKit's "closed quietly" code for a turn that was cancelled under us.
_MAPPING: tuple[tuple[type[BaseException], int, bool], ...] = (
    (StreamCancelled, 499, True),
    (InvalidAudioError, 400, False),
    (TextTooLongError, 413, False),
    (ContextOverflowError, 413, False),
    (AdmissionError, 503, True),
    (EngineClosed, 503, False),
    (StreamFailed, 500, True),
    (TimeoutError, 504, True),
    (CheckpointError, 500, False),
    (MossError, 500, False),
)


class MossTTSError(APIStatusError):
    """A MOSS engine failure as a LiveKit `APIStatusError`; `moss_error` is the core exception."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        retryable: bool,
        request_id: str | None = None,
        moss_error: BaseException | None = None,
    ) -> None:
        super().__init__(
            message, status_code=status_code, request_id=request_id, retryable=retryable
        )
        self.moss_error = moss_error


def to_api_error(exc: BaseException, *, request_id: str | None = None) -> APIError:
    """Map any exception raised while serving a turn to a `MossTTSError` (status and retryable);
    an `APIError` is already LiveKit's and passes through."""
    if isinstance(exc, APIError):
        return exc
    # a bug or a device failure outside the engine's own errors: not worth a retry
    status, retryable = next(
        ((code, retry) for kind, code, retry in _MAPPING if isinstance(exc, kind)), (500, False)
    )
    message = f"moss engine: {type(exc).__name__}: {exc}"
    err = MossTTSError(
        message, status_code=status, retryable=retryable, request_id=request_id, moss_error=exc
    )
    err.__cause__ = exc
    return err
