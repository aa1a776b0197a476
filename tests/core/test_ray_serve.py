"""The engine server on Ray Serve (core/server/ray_serve.py): two CPU replicas with tiny weights
behind Ray's HTTP proxy on a local two-core cluster. Sessions stay on their replica across
connections, a full replica refuses clearly, strangers are refused, a misbehaving socket ends
only itself, and a drained replica takes nothing new while its open calls finish.

The drain test changes its replica for good: it runs last."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import pytest

pytest.importorskip("ray")

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from core import TurnStatus  # noqa: E402
from core.errors import AdmissionError, ProtocolError  # noqa: E402
from core.remote import RemoteEngine  # noqa: E402
from core.remote.connection import SESSION_HEADER  # noqa: E402
from core.remote.post import post  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
SLOTS = 3  # conversations per replica
pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_dirs):
    """A local Ray cluster, Serve's proxy on a free loopback port and two replicas:
    (url, handle). Torn down at the end of the module."""
    import ray
    from ray import serve

    from core.server.ray_serve import RayServeSpec, deployment

    model_dir, codec_dir = tiny_dirs
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        spec = RayServeSpec(model=str(model_dir), codec=str(codec_dir), device="cpu", replicas=2,
                            num_cpus=0.25, graceful_shutdown_s=10.0,
                            engine={"max_streams": 2, "max_conversations": SLOTS,
                                    "max_frames_per_turn": 20, "lead_s": None})
        handle = serve.run(deployment(spec, TOKEN), name="moss-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}", handle
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def _ws(url: str) -> str:
    return url.replace("http://", "ws://") + "/v1/conversation"


def _headers(session: str, token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", SESSION_HEADER: session}


async def _turn(url: str, session: str, text: str = "Hi there.") -> str:
    """One turn on a new connection of `session`; the server that welcomed it."""
    engine = RemoteEngine(url, token=TOKEN)
    try:
        conv = engine.conversation(session_id=session)
        stream = conv.speak()
        stream.push_text(text)
        stream.end_text()
        chunks = [c async for c in stream]
        assert chunks and chunks[-1].final and stream.status is TurnStatus.FINISHED
        assert conv.server
        await conv.aclose()
        return conv.server
    finally:
        await engine.aclose()


async def _ready(url: str, session: str) -> int:
    """`GET /ready` through the proxy, routed like `session`'s conversations."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":")[-1]))
    writer.write(f"GET /ready HTTP/1.1\r\nHost: x\r\n{SESSION_HEADER}: {session}\r\n"
                 "Connection: close\r\n\r\n".encode())
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return int(line.split()[1])


async def _server_of(url: str, session: str) -> str:
    return await _turn(url, session)


async def _sessions(url: str, prefix: str, n: int, *, on: str | None = None,
                    off: str | None = None) -> list[str]:
    """`n` session ids the router sends to replica `on` (or to any but `off`). One session
    is one conversation at a time: a newer socket of a session takes its conversation over."""
    found = []
    for i in range(60):
        server = await _server_of(url, f"{prefix}-{i}")
        if (on is None or server == on) and server != off:
            found.append(f"{prefix}-{i}")
            if len(found) == n:
                return found
    raise AssertionError(f"the router never sent {n} sessions where wanted")


async def _session_on_another_server(url: str, server: str, prefix: str) -> str:
    """A session id the router sends to a replica other than `server`."""
    return (await _sessions(url, prefix, 1, off=server))[0]


async def _replicas_running(n: int, limit_s: float = 60.0) -> None:
    """Wait until Ray runs `n` replicas and nothing else, and its routers have seen them."""
    from ray import serve

    deadline = time.monotonic() + limit_s
    while True:
        states = serve.status().applications["moss-test"].deployments["EngineReplica"]
        if dict(states.replica_states) == {"RUNNING": n}:
            break
        assert time.monotonic() < deadline, states.replica_states
        await asyncio.sleep(0.2)
    await asyncio.sleep(2.0)  # the routers' long poll


async def test_each_session_stays_on_its_replica_across_connections(cluster):
    """Prevents a reconnecting call from landing on a replica without its cache: 12 sessions
    x 3 turns, each turn on a new connection, every turn back on the session's first replica,
    and both replicas get sessions."""
    url, _ = cluster
    first: dict[str, str] = {}
    seen: dict[str, list[str]] = {}
    gate = asyncio.Semaphore(2)  # at most 2 open at once: never more than SLOTS on one replica

    async def session(sid: str) -> None:
        for turn in range(3):
            async with gate:
                server = await _turn(url, sid, f"Turn {turn} of {sid}.")
            first.setdefault(sid, server)
            seen.setdefault(sid, []).append(server)

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(session(f"call-{i}") for i in range(12))), 120)
    assert all(servers == [first[sid]] * 3 for sid, servers in seen.items()), seen
    assert len(set(first.values())) == 2, first
    print(f"36 turns in {time.monotonic() - t0:.1f} s")


async def test_a_full_replica_refuses_a_new_conversation_at_once(cluster):
    """Prevents a call hanging on a full replica: with its SLOTS conversations open, the next
    conversation of a session routed there ends its first turn with AdmissionError within
    seconds (the replica takes the socket and refuses it; Ray does not queue it), its /ready
    answers 503, while the other replica still serves; once a slot frees, it is taken."""
    url, _ = cluster
    full = await _server_of(url, "full")
    other = await _session_on_another_server(url, full, "elsewhere")
    sessions = await _sessions(url, "full", SLOTS + 1, on=full)
    engine = RemoteEngine(url, token=TOKEN)
    try:
        convs = [engine.conversation(session_id=sid) for sid in sessions[:SLOTS]]
        for conv in convs:
            stream = conv.speak()
            stream.push_text("Hold on.")
            stream.end_text()
            _ = [c async for c in stream]
        assert {c.server for c in convs} == {full}
        t0 = time.monotonic()
        extra = engine.conversation(session_id=sessions[SLOTS])
        stream = extra.speak()
        stream.end_text()
        with pytest.raises(AdmissionError):
            await asyncio.wait_for(stream.__anext__(), 10)
        assert time.monotonic() - t0 < 5
        assert await _ready(url, sessions[0]) == 503
        assert await _ready(url, other) == 200
        await convs.pop().aclose()
        await extra.aclose()
        assert await _turn(url, sessions[SLOTS]) == full
    finally:
        await engine.aclose()


async def test_a_wrong_token_is_refused_through_the_proxy(cluster):
    """Prevents an open engine behind Ray: POST /v1/voices answers 401 and a conversation's
    socket is refused (ProtocolError on the client, close 4401 on the wire)."""
    url, _ = cluster
    status, _, body = await post(f"{url}/v1/voices", b"x", _headers("stranger", "wrong-token"))
    assert status == 401 and json.loads(body)["type"] == "ProtocolError"
    async with connect(_ws(url), additional_headers=_headers("stranger", "nope"),
                       proxy=None) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd.code == 4401
    bad = RemoteEngine(url, token="wrong-token")
    stream = bad.conversation(session_id="stranger").speak()
    stream.end_text()
    with pytest.raises(ProtocolError):
        await asyncio.wait_for(stream.__anext__(), 10)
    await bad.aclose()


async def test_a_10_mb_message_closes_only_its_own_socket(cluster):
    """Prevents one client's oversized frame from hurting its replica: that socket gets a
    ProtocolError and close 1009 through the proxy, while another conversation on the same
    replica finishes its turn."""
    url, _ = cluster
    engine = RemoteEngine(url, token=TOKEN)
    try:
        conv = engine.conversation(session_id="big")
        stream = conv.speak()
        stream.push_text("A turn that goes on while another socket misbehaves.")
        first = await asyncio.wait_for(stream.__anext__(), 20)
        hello = json.dumps({"type": "hello", "versions": [1], "sampling": None, "voice": None})
        async with connect(_ws(url), additional_headers=_headers("big"), proxy=None,
                           max_size=None) as ws:
            errors = []
            for frame in (hello, "x" * (10 << 20)):
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(frame)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
                    if msg["type"] == "welcome":
                        assert msg["server"] == conv.server  # the same replica
                    elif msg["type"] == "error":
                        errors.append(msg["error"]["type"])
            assert errors == ["ProtocolError"] and closed.value.rcvd.code == 1009
        stream.end_text()
        rest = [c async for c in stream]
        assert first and rest and rest[-1].final and stream.status is TurnStatus.FINISHED
        await conv.aclose()
    finally:
        await engine.aclose()


async def _say(conv, text: str) -> None:
    stream = conv.speak()
    stream.push_text(text)
    stream.end_text()
    chunks = [c async for c in stream]
    assert chunks and chunks[-1].final and stream.status is TurnStatus.FINISHED


async def test_a_killed_replica_s_calls_continue_on_the_other_after_a_rebuild(cluster):
    """Prevents the loss of a replica from ending its calls: a call speaking on the replica
    that is killed loses that turn (StreamFailed), then its next turn runs on another replica,
    rebuilt from the history the client keeps; a call on the other replica never notices."""
    import ray

    from core.errors import StreamFailed

    url, _ = cluster
    engine = RemoteEngine(url, token=TOKEN)
    try:
        lost = engine.conversation(session_id="kill-lost")
        await _say(lost, "Before the loss.")
        victim = lost.server
        other = await _session_on_another_server(url, victim, "kill-kept")
        kept = engine.conversation(session_id=other)
        await _say(kept, "Before the loss.")
        survivor = kept.server
        stream = lost.speak()
        stream.push_text("A call cut by the loss of its replica.")
        await asyncio.wait_for(stream.__anext__(), 20)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        with contextlib.suppress(StreamFailed):
            async for _ in stream:
                pass
        await asyncio.wait_for(_say(lost, "After the loss."), 60)
        assert lost.server != victim and lost.rebuilds >= 1
        assert lost.turns[0].text and len(lost.turns) >= 2
        await _say(kept, "Still here.")
        assert kept.server == survivor and kept.rebuilds == 0
        await lost.aclose()
        await kept.aclose()
    finally:
        await engine.aclose()
    await _replicas_running(2)  # Ray replaces the lost replica: let the ring settle


async def test_replicas_are_added_for_open_conversations_not_cpu(cluster, tiny_dirs):
    """Prevents autoscaling on the wrong figure: a second application (min 1, max 2 replicas
    of 2 slots) gets its second replica once both slots of the first hold idle conversations
    (no CPU load at all), through our policy on the replicas' own figures."""
    from ray import serve

    from core.server.ray_serve import RayServeSpec, deployment

    url, _ = cluster
    model_dir, codec_dir = tiny_dirs
    spec = RayServeSpec(model=str(model_dir), codec=str(codec_dir), device="cpu", num_cpus=0.25,
                        min_replicas=1, max_replicas=2, graceful_shutdown_s=5.0,
                        engine={"max_streams": 2, "max_conversations": 2,
                                "max_frames_per_turn": 20, "lead_s": None})
    serve.run(deployment(spec, TOKEN), name="moss-scale", route_prefix="/scale")
    engine = RemoteEngine(f"{url}/scale", token=TOKEN)
    try:
        convs = [engine.conversation(session_id=f"scale-{i}") for i in range(2)]
        for conv in convs:
            await _say(conv, "Hi.")
        deadline = time.monotonic() + 60
        while True:
            states = serve.status().applications["moss-scale"].deployments["EngineReplica"]
            if dict(states.replica_states).get("RUNNING") == 2:
                break
            assert time.monotonic() < deadline, states.replica_states
            await asyncio.sleep(0.5)
        for conv in convs:
            await conv.aclose()
    finally:
        await engine.aclose()
        serve.delete("moss-scale")


async def test_a_drained_replica_takes_nothing_new_while_its_call_finishes(cluster):
    """Prevents a scale-down from cutting calls or taking new ones: after the drain (what the
    replica runs when Ray stops it), its /ready is 503 and a new conversation routed there is
    refused with AdmissionError, while the conversation open on it finishes its turn."""
    url, handle = cluster
    engine = RemoteEngine(url, token=TOKEN)
    try:
        conv = engine.conversation(session_id="drain")
        stream = conv.speak()
        stream.push_text("A call that must not be cut by the drain.")
        first = await asyncio.wait_for(stream.__anext__(), 20)
        (newcomer,) = await _sessions(url, "drain-late", 1, on=conv.server)
        assert await _ready(url, "drain") == 200
        on = handle.options(session_id="drain")  # a handle call routes like the proxy
        assert await on.options(method_name="sees_ray_stop").remote()  # drains when Ray stops it
        drained = await on.options(method_name="drain").remote()
        assert drained == conv.server
        assert await _ready(url, "drain") == 503 and await _ready(url, newcomer) == 503
        late = engine.conversation(session_id=newcomer)
        refused = late.speak()
        refused.end_text()
        with pytest.raises(AdmissionError, match="draining"):
            await asyncio.wait_for(refused.__anext__(), 10)
        stream.end_text()
        rest = [c async for c in stream]
        assert first and rest[-1].final and stream.status is TurnStatus.FINISHED
        await late.aclose()
        await conv.aclose()
    finally:
        await engine.aclose()


def test_the_autoscaling_policy_counts_slots_not_cpu():
    """Prevents scaling on the wrong figure: replicas follow open conversations over slots
    (75 % busy target), a replica short of KV rows adds one, and down is one at a time."""
    from types import SimpleNamespace

    from core.server.ray_serve import autoscaling_policy, wanted_replicas

    assert wanted_replicas(0, 8, False, 1) == 1
    assert wanted_replicas(6, 8, False, 1) == 1
    assert wanted_replicas(7, 8, False, 1) == 2
    assert wanted_replicas(2, 8, True, 2) == 3

    def ctx(conversations: list[float], current: int, kv_free: float = 0.5):
        ids = range(len(conversations))
        return SimpleNamespace(
            policy_state={}, target_num_replicas=current, total_queued_requests=0.0,
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
            aggregated_metrics={
                "conversations": dict(zip(ids, conversations, strict=True)),
                "slots": dict.fromkeys(ids, 8.0), "kv_rows_free_share": dict.fromkeys(ids, kv_free)})

    assert autoscaling_policy(ctx([8, 8], 2))[0] == 3  # 16 open on 2 x 8 slots: over 75 %
    assert autoscaling_policy(ctx([8, 8, 8, 8], 4))[0] == 4  # capped by max_replicas
    assert autoscaling_policy(ctx([0, 0, 0, 0], 4))[0] == 3  # one at a time
    assert autoscaling_policy(ctx([1, 1], 2))[0] == 1
    assert autoscaling_policy(ctx([1, 1], 2, kv_free=0.05))[0] == 3  # KV short: CPU never asked


def test_serve_ray_checks_its_flags_before_starting_anything(monkeypatch, capsys):
    """Prevents a cluster started for nothing: bad replica counts are one line, exit code 2."""
    from core.cli import main
    from core.server.auth import TOKEN_ENV

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    for flags in (["--replicas", "0"], ["--min-replicas", "3", "--max-replicas", "2"],
                  ["--min-replicas", "1"]):
        assert main(["serve", "--tiny", "--device", "cpu", "--ray", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("moss-tts: error: --replicas") and err.count("\n") == 1, err


def test_the_example_config_builds_the_app(monkeypatch):
    """Prevents a stale `serve run examples/ray_serve.yaml`: its import path and args build
    the application (sticky router, our autoscaling figures when min/max are given)."""
    import importlib
    from pathlib import Path

    import yaml
    from ray import serve

    from core.server.auth import TOKEN_ENV
    from core.server.ray_serve import CONSISTENT_HASH_ROUTER, RayServeSpec, deployment

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    config = yaml.safe_load((Path(__file__).parents[2] / "examples" / "ray_serve.yaml").read_text())
    app = config["applications"][0]
    module, _, name = app["import_path"].partition(":")
    built = getattr(importlib.import_module(module), name)(app["args"])
    assert isinstance(built, serve.Application)
    options = built._bound_deployment._deployment_config
    assert options.max_ongoing_requests == 64 + 4 and options.graceful_shutdown_timeout_s == 600
    router = options.request_router_config
    assert router.request_router_class == CONSISTENT_HASH_ROUTER
    assert router.request_router_kwargs == {"num_fallback_replicas": 0}
    scaled = deployment(RayServeSpec(tiny=True, device="cpu", min_replicas=1, max_replicas=3),
                        TOKEN)._bound_deployment._deployment_config.autoscaling_config
    assert (scaled.min_replicas, scaled.max_replicas) == (1, 3)
    assert scaled.policy.policy_function == "core.server.ray_serve:autoscaling_policy"
