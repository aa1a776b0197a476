"""One device rule for the engine, both plugins, the CLI and every example.

`"auto"` means CUDA when torch sees a GPU, else the CPU with one warning: the 1.7 B model on a CPU
runs at about 0.08x real time, so a GPU user whose torch is a CPU build should learn it at once,
not from a silent, slow first call.
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger("core.device")

AUTO = "auto"
COMPUTE_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})  # model and codec
CPU_WARNING = (
    "no CUDA device visible to torch: running on the CPU; real MOSS weights on a CPU are not real "
    "time (about 0.08x; install a CUDA build of torch for a GPU)"
)

_warned = threading.Event()


def resolve_device(device: str | torch.device | None = AUTO) -> torch.device:
    """`"auto"` (or None) -> CUDA if available, else CPU (warned once per process)."""
    if device is None or device == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if not _warned.is_set():
            _warned.set()
            log.warning(CPU_WARNING)
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
