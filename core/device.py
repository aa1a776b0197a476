"""One device rule for the engine, both plugins, the CLI and every example.

`"auto"` means CUDA when torch sees a GPU, else the CPU with one warning: the 1.7 B model on a CPU
runs at about 0.08x real time, so a GPU user whose torch is a CPU build should learn it at once,
not from a silent, slow first call.
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable
from typing import Any

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


def compile_step(
    fn: Callable[..., Any], *, dynamic: bool | None = False, cpp_wrapper: bool = False
) -> Callable[..., Any]:
    """`torch.compile` as the engine's per-tick steps use it: one whole graph (`fullgraph`), no
    guards on the modules (their weights are loaded once and never reassigned; the guards on
    every weight cost ~0.1 ms per call at tiny dimensions, a twentieth of a compiled frame).
    Without those guards a graph must never serve another model: dynamo keeps graphs per code
    object, so each call compiles a private copy of `fn` (one per engine; inductor's disk cache
    still shares identical graphs). `cpp_wrapper` calls the graph's kernels from C++ instead
    of Python: less host time per call for a graph of many kernels, more compile time."""
    options: dict[str, Any] = {}
    skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip_module_guards is not None:  # missing from older torch: guards stay
        options["guard_filter_fn"] = skip_module_guards
    if cpp_wrapper:
        options["cpp_wrapper"] = True
    private = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                 fn.__defaults__, fn.__closure__)
    return torch.compile(private, fullgraph=True, dynamic=dynamic, options=options)


def at_least_two_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Batch-first tensors of one row as two copies of it, others as they are: the compiled
    steps' batch is dynamic from 2 up (dynamo specialises a batch of 1, which would compile a
    second graph on a live stream)."""
    if tensors[0].shape[0] != 1:
        return tensors
    return tuple(t.repeat(2, *([1] * (t.dim() - 1))) for t in tensors)
