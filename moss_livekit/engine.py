"""One `Engine` per worker process, shared by every room, and what LiveKit's worker needs of it.

LiveKit runs each room ("job") in its own process by default. A 1.7 B model plus its codec per
room process would load the weights and a CUDA context once per call, so the recommended setup is
the THREAD executor: every room of the worker is a thread (own event loop) in one process, and
they all share the engine loaded here, which batches their turns on one device thread.

* `shared_engine(...)`: the process-wide engine for these weights, loaded once (thread-safe).
* `prewarm(proc)`: a LiveKit `setup_fnc` that loads it before the first room arrives.
* `load_fnc()`: worker load = slot occupancy of the shared engine(s), so LiveKit dispatch stops
  sending rooms to a full worker (the default load function only measures CPU).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import Engine, EngineConfig
from core.device import resolve_device

from .compat import CLIError  # the one error LiveKit's CLI prints plainly (a private class)
from .log import logger

if TYPE_CHECKING:
    from livekit.agents import JobProcess

DEFAULT_MODEL = "OpenMOSS-Team/MOSS-TTS-Realtime"
DEFAULT_CODEC = "OpenMOSS-Team/MOSS-Audio-Tokenizer"
USERDATA_KEY = "moss_engine"
# Loading real weights takes far longer than LiveKit's default 10 s setup budget.
RECOMMENDED_INITIALIZE_TIMEOUT_S = 600.0

_lock = threading.Lock()
_engines: dict[tuple[str, str, str, EngineConfig | None], Engine] = {}


def shared_engine(
    model: str | Path = DEFAULT_MODEL,
    codec: str | Path = DEFAULT_CODEC,
    *,
    device: str = "auto",
    config: EngineConfig | None = None,
) -> Engine:
    """Return the process-wide engine for these weights, loading it on first use.

    Blocking (it may load gigabytes): call it from a setup function or a worker thread, e.g.
    `await asyncio.to_thread(shared_engine, ...)`. Concurrent callers wait for one load.
    """
    key = (str(model), str(codec), str(resolve_device(device)), config)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            logger.info("loading MOSS engine model=%s codec=%s device=%s", *key[:3])
            kwargs: dict[str, Any] = {"device": key[2]}
            if config is not None:
                kwargs["config"] = config
            engine = Engine.from_pretrained(model, codec, **kwargs)
            _engines[key] = engine
        return engine


class WeightsDownloadError(CLIError):
    """`download-files` could not fetch the weights (offline, unknown repo, no access, disk)."""


def register_engine(engine: Engine) -> Engine:
    """Make an engine built elsewhere visible to `load_fnc` (e.g. one created in a test).

    Raises:
        TypeError: `engine` has no `stats()` (a `core.remote.RemoteEngine`: its load is the
            server's, scraped from the server's `/metrics`, not this worker's).
    """
    _check_has_stats(engine)
    with _lock:
        if engine not in _engines.values():
            _engines[("<registered>", str(id(engine)), "", None)] = engine
    return engine


def close_shared_engines() -> None:
    """Close every shared engine (process shutdown, tests)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()


def prewarm(
    proc: JobProcess,
    *,
    model: str | Path = DEFAULT_MODEL,
    codec: str | Path = DEFAULT_CODEC,
    device: str = "auto",
    config: EngineConfig | None = None,
) -> Engine:
    """LiveKit `setup_fnc`: load the shared engine once and put it in `proc.userdata`.

    Bind the arguments with `functools.partial` and give the server an
    `initialize_process_timeout` of `RECOMMENDED_INITIALIZE_TIMEOUT_S`.
    """
    engine = shared_engine(model, codec, device=device, config=config)
    proc.userdata[USERDATA_KEY] = engine
    return engine


def engine_occupancy(engine: Engine) -> float:
    """Fraction of the engine's capacity in use: the fuller of rooms and speaking turns.

    Raises:
        TypeError: `engine` is a `core.remote.RemoteEngine`, which has no `stats()` (the
            protocol carries none: scrape the engine server's `/metrics`).
    """
    _check_has_stats(engine)
    stats, config = engine.stats(), engine.config
    return max(
        stats.conversations / config.max_conversations,
        stats.active_streams / config.max_streams,
    )


def load_fnc() -> float:
    """LiveKit `load_fnc`: the occupancy (0..1) of the fullest shared engine of this process.

    Only meaningful with the THREAD executor, where the engine lives in the worker's process; a
    value at or above the server's `load_threshold` marks the worker full for new rooms.
    """
    with _lock:
        engines = list(_engines.values())
    return max((min(engine_occupancy(e), 1.0) for e in engines), default=0.0)


def _check_has_stats(engine: object) -> None:
    if not callable(getattr(engine, "stats", None)):
        raise TypeError(
            f"{type(engine).__name__} has no stats(): the occupancy of a remote engine is its "
            "server's (scrape the server's /metrics); load_fnc counts in-process engines only"
        )
