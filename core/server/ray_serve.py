"""`moss-tts serve --ray`: the engine server scaled out on Ray Serve, one replica per GPU.

Each replica runs the same app as `moss-tts serve` (`create_app`: `/v1/conversation`,
`/v1/voices`, `/health`, `/ready`, `/metrics`) around its own `Engine`; Ray's HTTP proxy routes
every request of a session (header `x-session-id`, sent by `RemoteEngine`) to the same replica
with the consistent-hash router, so a conversation that reconnects finds its KV cache again.

- Capacity: every open WebSocket is one ongoing request for its whole life, so a replica takes
  `max_ongoing_requests` = the engine's `max_conversations` plus a few for short HTTP requests
  (`HTTP_HEADROOM`); the app itself refuses a conversation beyond `max_conversations`
  (`AdmissionError`, close 1013), so a full replica answers at once instead of queueing the
  handshake in Ray's router.
- Autoscaling (`min_replicas` < `max_replicas`): each replica reports its free conversation
  slots and free KV rows (`record_autoscaling_stats`); `autoscaling_policy` turns them into a
  replica count. Never CPU load.
- Scale-down and shutdown drain: when Ray stops a replica, its `ServerControl` is drained at
  once (no new conversations, `/ready` 503), open conversations get up to
  `graceful_shutdown_s` (default 600 s) to end, then the engine closes.

`build_app(args)` is the `serve run` / config-file entry (examples/ray_serve.yaml); `run(...)`
is what `moss-tts serve --ray` calls.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingContext, RequestRouterConfig

log = logging.getLogger("ray.serve")  # Ray configures it on replicas: lines land in their logs

CONSISTENT_HASH_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
HTTP_HEADROOM = 4  # ongoing requests a full replica still takes: /v1/voices, /ready, refusals
TARGET_BUSY = 0.75  # the autoscaler adds replicas above this share of conversation slots in use
KV_LOW = 0.10  # ... or when a replica has less than this share of its KV rows free
LEFTOVER_S = 5.0  # after Ray's drain, how long conversations without a socket may still end
UPSCALE_DELAY_S = 5.0  # load above the target this long adds replicas
DOWNSCALE_DELAY_S = 600.0  # load below it this long removes one (Ray's default)


@dataclass(frozen=True)
class RayServeSpec:
    """What every replica loads and how the deployment scales (JSON-able: it travels to Ray).

    `model`/`codec`: local directories or hub ids (None: the official checkpoints), or `tiny`
    for random tiny weights. `engine`: `EngineConfig` fields. `num_cpus` is a replica's CPU
    reservation when it runs on the CPU; on CUDA a replica takes one GPU.
    """

    model: str | None = None
    codec: str | None = None
    tiny: bool = False
    device: str = "auto"
    engine: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1
    min_replicas: int | None = None  # both set (min < max): autoscaling on our own load figures
    max_replicas: int | None = None
    num_cpus: float = 1.0
    http_headroom: int = HTTP_HEADROOM
    graceful_shutdown_s: float = 600.0
    name: str = "moss-tts"
    route_prefix: str = "/"

    def __post_init__(self) -> None:
        if self.tiny and (self.model is not None or self.codec is not None):
            raise ValueError("tiny brings its own random weights; drop model/codec or tiny")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both min_replicas and max_replicas, or neither")
        if self.max_replicas is not None and not 0 < self.min_replicas <= self.max_replicas:  # type: ignore[operator]
            raise ValueError(f"need 0 < min_replicas <= max_replicas, got "
                             f"{self.min_replicas}..{self.max_replicas}")
        if self.num_cpus <= 0 or self.graceful_shutdown_s < 0:
            raise ValueError("num_cpus must be > 0 and graceful_shutdown_s >= 0")

    def replica_args(self) -> dict[str, Any]:
        """What a replica needs to load: changing only the scaling fields keeps the replicas
        (Ray starts a new version, replacing every replica, when these change)."""
        return {"model": self.model, "codec": self.codec, "tiny": self.tiny,
                "device": self.device, "engine": dict(self.engine),
                "graceful_shutdown_s": self.graceful_shutdown_s}

    def engine_config(self) -> Any:
        from core.engine.config import EngineConfig

        return EngineConfig(**self.engine)

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > self.min_replicas  # type: ignore[operator]


def sticky_router_config() -> RequestRouterConfig:
    """Route by `x-session-id` to one replica (Ray's experimental consistent-hash router,
    no fallback: a session never spills onto a replica without its cache); Ray's default
    router, with a warning, when this Ray has no such class."""
    module, _, name = CONSISTENT_HASH_ROUTER.partition(":")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        log.warning("%s is missing in this Ray: sessions are NOT sticky across connections "
                    "(Ray's default router)", CONSISTENT_HASH_ROUTER)
        return RequestRouterConfig()
    return RequestRouterConfig(request_router_class=CONSISTENT_HASH_ROUTER,
                               request_router_kwargs={"num_fallback_replicas": 0})


# -- autoscaling: our own figures, never CPU ---------------------------------------------------
def wanted_replicas(conversations: float, slots: float, kv_low: bool, current: int) -> int:
    """Replicas for `conversations` open on replicas of `slots` each, at most `TARGET_BUSY`
    busy; one more than now while some replica is short of KV rows (pure: tested alone)."""
    need = math.ceil(conversations / max(1.0, slots * TARGET_BUSY)) if slots > 0 else current
    return max(need, current + 1 if kv_low else 0, 1)


def autoscaling_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Ray's custom policy: replica count from the replicas' `record_autoscaling_stats`.

    Up at once to what the load needs, down one replica at a time (a replica going away
    drains its calls, which takes long). Ray applies the bounds and its `upscale_delay_s` /
    `downscale_delay_s` around this function."""
    metrics = ctx.aggregated_metrics or {}
    conversations = sum(metrics.get("conversations", {}).values())
    slots = max(metrics.get("slots", {}).values(), default=0.0)
    kv_low = any(v < KV_LOW for v in metrics.get("kv_rows_free_share", {}).values())
    current = ctx.target_num_replicas
    # queued handshakes (a full replica) count as conversations wanting a place
    wanted = wanted_replicas(conversations + (ctx.total_queued_requests or 0.0), slots, kv_low,
                             current)
    wanted = min(max(wanted, ctx.capacity_adjusted_min_replicas),
                 ctx.capacity_adjusted_max_replicas)
    return (wanted if wanted >= current else current - 1), dict(ctx.policy_state or {})


# -- Ray's stop of a replica -------------------------------------------------------------------
def _ray_replica_stopping() -> bool | None:
    """Whether Ray has begun this replica's graceful shutdown; None when this Ray does not
    tell (then the drain starts only after Ray's own wait, in the replica's `__del__`).
    Ray 2.60 has no public hook at the start of a stop: this reads its replica's flag."""
    try:
        from ray._private.worker import global_worker

        replica = global_worker.actors[global_worker.actor_id]._replica_impl
        return bool(replica._shutting_down)
    except Exception:  # noqa: BLE001 - any change in Ray's internals: fall back
        return None


@serve.ingress()
class EngineReplica:
    """One engine, its app and its `ServerControl` (id: Ray's replica id)."""

    def __init__(self, load: dict[str, Any], token: str) -> None:
        from core.engine.engine import Engine
        from core.server.control import ServerControl

        self.spec = RayServeSpec(**load)
        self._token = token
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        model, codec = self.spec.model, self.spec.codec
        if self.spec.tiny:
            from core.tiny import write_tiny

            self._tmp = tempfile.TemporaryDirectory(prefix="moss-tiny-")
            model_dir, codec_dir = write_tiny(self._tmp.name)
            model, codec = str(model_dir), str(codec_dir)
        self.engine = Engine.from_pretrained(
            model or "OpenMOSS-Team/MOSS-TTS-Realtime", codec or "OpenMOSS-Team/MOSS-Audio-Tokenizer",
            device=self.spec.device, config=self.spec.engine_config())
        self._kv_rows = self.engine.stats().kv_rows_free or 0  # idle: the whole pool is free
        context = serve.get_replica_context()
        self.control = ServerControl(context.replica_id.to_full_id_str())  # its actor's name
        self._closing = threading.Event()
        self._watch = threading.Thread(target=self._watch_stop, name="ray-stop-watch", daemon=True)
        self._watch.start()
        log.info("replica %s serving %d conversations", self.control.server_id,
                 self.engine.config.max_conversations)

    def __serve_build_asgi_app__(self) -> Any:
        from core.server.app import create_app

        return create_app(self.engine, token=self._token, control=self.control)

    # -- called by Ray, or through a handle (`handle.options(method_name=..., session_id=...)`)
    def record_autoscaling_stats(self) -> dict[str, float]:
        stats = self.engine.stats()
        slots = self.engine.config.max_conversations
        out = {"conversations": float(stats.conversations), "slots": float(slots),
               "free_slots": float(max(0, slots - stats.conversations)),
               "kv_rows_free_share": 1.0}
        if stats.kv_rows_free is not None:
            self._kv_rows = max(self._kv_rows, stats.kv_rows_free)
            out["kv_rows_free_share"] = stats.kv_rows_free / max(1, self._kv_rows)
        return out

    def check_health(self) -> None:
        if self.engine.closed and not self._closing.is_set():
            raise RuntimeError("the engine is closed")

    def server_id(self) -> str:
        return self.control.server_id

    def sees_ray_stop(self) -> bool:
        """Whether this replica can tell when Ray starts stopping it (else it drains late)."""
        return _ray_replica_stopping() is not None

    def drain(self) -> str:
        """Take no new conversations (open ones go on); answers this replica's id."""
        self.control.drain()
        return self.control.server_id

    def _watch_stop(self) -> None:
        told = False
        while not self._closing.wait(0.25):
            stopping = _ray_replica_stopping()
            if stopping is None and not told:
                told = True
                log.warning("cannot see Ray's replica shutdown: drains start in __del__ only")
            if stopping:
                log.info("replica %s: Ray is stopping it, draining", self.control.server_id)
                self.control.drain()
                return

    async def __del__(self) -> None:
        """Ray's stop, after its own wait (up to `graceful_shutdown_s`) for every open socket:
        drain (if the watch did not), give conversations still open (a dropped socket's,
        parked for a resume that cannot reach a stopping replica) a moment, close the engine."""
        self.control.drain()
        self._closing.set()
        deadline = time.monotonic() + min(LEFTOVER_S, self.spec.graceful_shutdown_s)
        while time.monotonic() < deadline:
            if not self.engine.stats().conversations:
                break
            await asyncio.sleep(0.2)
        await self.engine.aclose()
        if self._tmp is not None:
            self._tmp.cleanup()


def deployment(spec: RayServeSpec, token: str) -> serve.Application:
    """The bound application: `serve.run(deployment(spec, token))`."""
    config = spec.engine_config()
    on_gpu = _gpu_wanted(spec.device)
    options: dict[str, Any] = {
        "name": "EngineReplica",
        "ray_actor_options": {"num_gpus": 1} if on_gpu else {"num_cpus": spec.num_cpus},
        "max_ongoing_requests": config.max_conversations + spec.http_headroom,
        "request_router_config": sticky_router_config(),
        "graceful_shutdown_timeout_s": spec.graceful_shutdown_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 5.0,
    }
    if spec.autoscaling:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=spec.min_replicas, max_replicas=spec.max_replicas,
            initial_replicas=min(max(spec.replicas, spec.min_replicas), spec.max_replicas),  # type: ignore[type-var]
            metrics_interval_s=2.0, look_back_period_s=10.0, upscale_delay_s=UPSCALE_DELAY_S,
            downscale_delay_s=DOWNSCALE_DELAY_S,
            policy={"policy_function": f"{__name__}:autoscaling_policy"})
    else:
        options["num_replicas"] = spec.replicas if spec.max_replicas is None else spec.max_replicas
    return serve.deployment(EngineReplica).options(**options).bind(spec.replica_args(), token)


def _gpu_wanted(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import ray

    return bool(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0)


def build_app(args: dict[str, Any]) -> serve.Application:
    """`serve run core.server.ray_serve:build_app tiny=true replicas=2`, or a config file's
    `import_path` with `args` (the fields of `RayServeSpec`, plus `token_file`). The token
    comes from `token_file` or `MOSS_SERVER_TOKEN` where the app is built."""
    from pathlib import Path

    from core.server.auth import read_token

    args = dict(args)
    token_file = args.pop("token_file", None)
    token = read_token(None if token_file is None else Path(token_file))
    for key in ("replicas", "min_replicas", "max_replicas"):
        if isinstance(args.get(key), str):
            args[key] = int(args[key])
    if isinstance(args.get("tiny"), str):
        args["tiny"] = args["tiny"].lower() in ("1", "true", "yes")
    spec = RayServeSpec(**args)
    return deployment(spec, token)


def run(spec: RayServeSpec, token: str, *, host: str, port: int) -> None:
    """Start a local Ray cluster (or join `RAY_ADDRESS`'s), serve until SIGTERM/SIGINT, then
    stop the replicas gracefully (each drains first). Blocking."""
    import contextlib
    import signal

    import ray

    joined = _cluster_running()
    if joined:
        ray.init()
    else:
        ray.init(include_dashboard=False)
    stop = threading.Event()
    # after ray.init, which sets its own (exit at once), and before the deployment: a SIGTERM
    # while the replicas load still stops them gracefully
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(spec, token), name=spec.name, route_prefix=spec.route_prefix)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):
            serve.delete(spec.name) if joined else serve.shutdown()
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()


def _cluster_running() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))
