"""The network engine (docs/PROTOCOL.md): `RemoteEngine` against `create_app` on 127.0.0.1
gives what the in-process `Engine` gives, refuses strangers, and a misbehaving socket ends only
itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random

import numpy as np
import pytest
from engine_kit import build_engine, load_parts
from engine_kit import say_all as _say
from engine_kit import until as _until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from core import SamplingParams, TurnStatus, UserTurn
from core.errors import (
    AdmissionError,
    InvalidAudioError,
    ProtocolError,
    StreamCancelled,
    TextTooLongError,
)
from core.remote import RemoteEngine
from core.remote.post import post
from core.server import ServerLimits
from core.server.run import serving as serve_loopback

TOKEN = "test-token-0123456789abcdef"
FRAME_S = 0.08
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def parts(tiny_dirs):
    return load_parts(tiny_dirs)


def serving(engine, limits: ServerLimits | None = None):
    """`create_app(engine)` on a free loopback port, for one test."""
    return serve_loopback(engine, token=TOKEN, limits=limits)


def _ws(url: str) -> str:
    return url.replace("http://", "ws://") + "/v1/conversation"


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _reference() -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal(24000 * 2)).astype(np.float32)


def _speech() -> bytes:
    rng = np.random.default_rng(1)
    return (3000 * rng.standard_normal(16000)).astype("<i2").tobytes()


async def _script(engine) -> dict:
    """Two turns with user turns, a voice and seeded sampling, then an interrupted turn."""
    voice = await engine.load_voice(_reference(), sample_rate=24000)
    conv = engine.conversation(voice=voice, sampling=SamplingParams(seed=5))
    first = await _say(conv.speak(user=UserTurn("Hello there.", _speech(), 16000)),
                       "Hi! How are you today?")
    await conv.add_user_turn("Fine, thanks.")
    second = await _say(conv.speak(user=UserTurn("And you?"),
                                   sampling=SamplingParams(temperature=0.7)), "Good to hear.")
    after_two = conv.turns
    stream = conv.speak()
    stream.push_text("one two three four five six seven eight nine ten " * 3)
    heard = []
    async for chunk in stream:
        heard.append(chunk)
        if sum(c.duration_s for c in heard) >= 6 * FRAME_S:
            break
    stream.stop()
    with pytest.raises(StreamCancelled):
        await stream.__anext__()
    assert stream.status is TurnStatus.CANCELLED
    stream.mark_played(0.16)
    await _until(lambda: len(conv.turns) == len(after_two) + 1 and conv.turns[-1].frames == 2)
    out = {"voice": voice.codes.tolist(), "first": first, "second": second,
           "turns": after_two, "heard": heard, "cut": conv.turns, "seed": conv.sampling.seed}
    await conv.aclose()
    return out


async def test_remote_engine_gives_what_the_in_process_engine_gives(parts):
    """Prevents the wire changing the audio or the history: the same script gives identical
    PCM, word timings and turns in process and over the socket, also after a barge-in."""
    local = build_engine(parts)
    try:
        expected = await _script(local)
    finally:
        local.close()
    served = build_engine(parts)
    try:
        async with serving(served) as url:
            remote = RemoteEngine(url, token=TOKEN)
            got = await _script(remote)
            await remote.aclose()
    finally:
        served.close()
    assert got["voice"] == expected["voice"]
    assert got["first"] and got["first"] == expected["first"]  # pcm, timings, words, final
    assert got["second"] == expected["second"]
    assert [c.words for c in got["second"]] == [c.words for c in expected["second"]]
    assert got["turns"] == expected["turns"] and len(got["turns"]) == 5
    assert got["heard"] == expected["heard"]
    assert got["cut"] == expected["cut"]


async def test_a_wrong_token_is_refused(parts):
    """Prevents an open engine: HTTP answers 401, the socket closes with 4401, and the
    client raises ProtocolError for both."""
    engine = build_engine(parts)
    try:
        async with serving(engine) as url:
            status, _, body = await post(f"{url}/v1/voices", b"x", _auth("wrong"))
            assert status == 401 and json.loads(body)["type"] == "ProtocolError"
            status, _, _ = await post(f"{url}/v1/voices", b"x", {})
            assert status == 401
            async with connect(_ws(url), additional_headers=_auth("nope"), proxy=None) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd.code == 4401
            bad = RemoteEngine(url, token="wrong-token")
            with pytest.raises(ProtocolError):
                await bad.load_voice(_reference(), sample_rate=24000)
            stream = bad.conversation().speak()
            stream.end_text()
            with pytest.raises(ProtocolError):
                await stream.__anext__()
            await bad.aclose()
            assert engine.stats().conversations == 0
            for path in ("/health", "/ready", "/metrics"):
                reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":")[-1]))
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                assert (await reader.readline()).startswith(b"HTTP/1.1 200")
                writer.close()
    finally:
        engine.close()


async def _expect_protocol_error(url: str, frames: list, code: int = 1008) -> None:
    """Send `frames` on a fresh socket: the answer is a ProtocolError, then close `code`."""
    async with connect(_ws(url), additional_headers=_auth(), proxy=None, max_size=None) as ws:
        for frame in frames:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(frame)
        errors = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                msg = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(msg, str) and json.loads(msg)["type"] == "error":
                    errors.append(json.loads(msg)["error"]["type"])
        assert errors == ["ProtocolError"], (frames[:3], errors)
        assert closed.value.rcvd.code == code, frames[:3]


async def test_an_oversized_message_closes_only_its_own_socket(parts):
    """Prevents one client's 10 MB frame from hurting others: it gets ProtocolError and 1009,
    while another conversation on the server finishes its turn."""
    engine = build_engine(parts, max_frames_per_turn=60)
    try:
        async with serving(engine) as url:
            remote = RemoteEngine(url, token=TOKEN)
            conv = remote.conversation(sampling=SamplingParams(seed=1))
            stream = conv.speak()
            stream.push_text("A turn that goes on while another socket misbehaves.")
            first = await stream.__anext__()
            hello = json.dumps({"type": "hello", "versions": [1], "sampling": None, "voice": None})
            await _expect_protocol_error(url, [hello, "x" * (10 << 20)], code=1009)
            await _expect_protocol_error(url, [hello, b"\0" * (10 << 20)], code=1009)
            async with connect(_ws(url), additional_headers=_auth(), proxy=None) as ws:
                await ws.send(hello)  # a client that leaves in the middle of its turn
                await ws.send(json.dumps({"type": "speak", "turn": 1, "users": []}))
                await ws.send(json.dumps({"type": "text", "turn": 1, "delta": "Bye now."}))
                await ws.send(json.dumps({"type": "end_text", "turn": 1}))
                while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "chunk":
                    pass
            stream.end_text()
            rest = [c async for c in stream]
            assert first and rest and rest[-1].final and stream.status is TurnStatus.FINISHED
            await _until(lambda: engine.stats().conversations == 1
                         and engine.stats().active_streams == 0)
            await remote.aclose()
    finally:
        engine.close()


def _fuzz_cases() -> list[list]:
    hello = {"type": "hello", "versions": [1], "sampling": None, "voice": None}
    h = json.dumps(hello)
    speak = {"type": "speak", "turn": 1, "users": []}
    cases: list[list] = [
        ["not json"], ["[]"], ["null"], ['{"type": 5}'], ['{"type": "nope"}'], [b"\x01\x02"],
        ['{"type": "hello", "versions": [1], "sampling": NaN, "voice": null}'],
        ["[" * 100_000 + "]" * 100_000],
        [json.dumps(speak)], [json.dumps({"type": "text", "turn": 1, "delta": "x"})],
        [json.dumps({**hello, "versions": "1"})], [json.dumps({**hello, "versions": [2, 3]})],
        [json.dumps({**hello, "versions": [True]})],
        [json.dumps({**hello, "sampling": {"temperature": "hot"}})],
        [json.dumps({**hello, "sampling": {"bogus": 1}})],
        [json.dumps({**hello, "sampling": {"seed": -1}})],
        [json.dumps({**hello, "sampling": {"top_k": 1.5}})],
        [json.dumps({**hello, "voice": "unknown-key"})], [json.dumps({**hello, "voice": 7})],
        [h, h], [h, b"binary where JSON is expected"],
        [h, json.dumps({"type": "text", "turn": 1, "delta": "x"})],
        [h, json.dumps({**speak, "turn": 0})], [h, json.dumps({**speak, "turn": 10**30})],
        [h, json.dumps({**speak, "turn": "1"})], [h, json.dumps({**speak, "users": "no"})],
        [h, json.dumps({**speak, "users": [1]})],
        [h, json.dumps({**speak, "users": [{"text": "hi", "sample_rate": 16000,
                                              "audio_bytes": 10}]}), "not the audio"],
        [h, json.dumps({**speak, "users": [{"text": "hi", "sample_rate": 16000,
                                              "audio_bytes": 10}]}), b"short"],
        [h, json.dumps({**speak, "users": [{"text": "hi", "sample_rate": None,
                                              "audio_bytes": 4}]}), b"\0" * 4],
        [h, json.dumps({**speak, "users": [{"text": 5, "audio_bytes": 0}]})],
        [h, json.dumps({**speak, "users": [{}] * 1000})],
        [h, json.dumps({**speak, "voice": "unknown"})],
        [h, json.dumps({**speak, "sampling": {"top_p": 2}})],
        [h, json.dumps(speak), json.dumps(speak)],
        [h, json.dumps(speak), json.dumps({"type": "played", "turn": 1, "played_s": -1})],
        [h, json.dumps(speak), json.dumps({"type": "played", "turn": 1, "played_s": "1"})],
        [h, json.dumps(speak), json.dumps({"type": "played", "turn": 1})],
        [h, json.dumps(speak), json.dumps({"type": "stop", "turn": 1, "played_s": 1e400})],
        [h, json.dumps(speak), json.dumps({"type": "stop", "turn": 2, "played_s": None})],
        [h, json.dumps(speak), json.dumps({"type": "text", "turn": 1, "delta": ["x"]})],
        [h, json.dumps({"type": "add_user", "request": -1, "text": "x", "sample_rate": None,
                        "audio_bytes": 0})],
        [h, json.dumps({"type": "add_user", "request": 1, "text": "x", "sample_rate": 16000,
                        "audio_bytes": 2}), json.dumps({"type": "close"})],
        [json.dumps({"type": "voice", "key": "k", "frames": 10**9})],
        [json.dumps({"type": "voice", "key": "k", "frames": 20}), b"\0" * 10],
        [json.dumps({"type": "voice", "key": "k", "frames": 20}),
         np.full((20, 16), 5000, "<i2").tobytes()],
        [json.dumps({"type": "voice", "key": ["k"], "frames": 20})],
    ]
    rng = random.Random(7)
    junk = [None, True, -1, 0, 2**70, 1.5, float("1e300"), "", "x" * 300, [], {}, [1, "a"],
            {"a": {"b": []}}]
    fields = ["turn", "delta", "played_s", "users", "voice", "sampling", "request", "text",
              "sample_rate", "audio_bytes", "key", "frames", "versions"]
    for _ in range(24):  # random junk in every field of a known type, after a hello
        kind = rng.choice(["hello", "voice", "speak", "text", "end_text", "stop", "played",
                           "add_user"])
        msg = {"type": kind, **{f: rng.choice(junk) for f in rng.sample(fields, 4)}}
        if kind == "speak":
            msg["users"] = rng.choice(["x", 3, [None]])
        cases.append([h, json.dumps(msg)])
    return cases


async def test_fuzzed_messages_get_a_protocol_error_and_never_crash_the_server(parts):
    """Prevents a malformed message from crashing the server or leaking a conversation:
    every case ends its own socket with ProtocolError, and the server still serves."""
    engine = build_engine(parts)
    try:
        async with serving(engine) as url:
            for frames in _fuzz_cases():
                await _expect_protocol_error(url, frames)
            await _until(lambda: engine.stats().conversations == 0)
            remote = RemoteEngine(url, token=TOKEN)
            conv = remote.conversation(sampling=SamplingParams(seed=3))
            assert await _say(conv.speak(user=UserTurn("Still there?")), "Yes, still here.")
            await remote.aclose()
    finally:
        engine.close()


async def test_errors_cross_the_wire_as_the_same_classes(parts):
    """Prevents plugins needing remote-specific error handling: AdmissionError,
    TextTooLongError and InvalidAudioError are raised as in process."""
    engine = build_engine(parts, max_streams=1, max_text_chars=50)
    try:
        async with serving(engine) as url:
            remote = RemoteEngine(url, token=TOKEN)
            busy = remote.conversation(sampling=SamplingParams(seed=1))
            speaking = busy.speak()
            speaking.push_text("A turn that holds the only stream.")
            await speaking.__anext__()
            assert remote.config.max_text_chars == 50  # the server's limits, from `welcome`
            with pytest.raises(TextTooLongError):
                speaking.push_text("x" * 60)
            other = remote.conversation()
            refused = other.speak()
            refused.end_text()
            with pytest.raises(AdmissionError):
                await refused.__anext__()
            assert type(refused.error) is AdmissionError and refused.status is TurnStatus.FAILED
            speaking.stop()
            with pytest.raises(TextTooLongError):
                other.speak(user=UserTurn("y" * 60))
            with pytest.raises(InvalidAudioError):  # silent: refused by the server's encoder
                await remote.load_voice(np.zeros(48000, np.float32), sample_rate=24000)
            with pytest.raises(InvalidAudioError):  # unreadable: refused before any upload
                await remote.load_voice(b"not audio at all")
            async with connect(_ws(url), additional_headers=_auth(), proxy=None) as ws:
                await ws.send(json.dumps({"type": "hello", "versions": [1], "sampling": None,
                                          "voice": None}))
                await ws.send(json.dumps({"type": "speak", "turn": 1, "users": []}))
                await ws.send(json.dumps({"type": "text", "turn": 1, "delta": "z" * 60}))
                seen = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
                errors = [m["error"]["type"] for m in seen if m["type"] == "error"]
                assert errors == ["TextTooLongError"] and seen[0]["type"] == "welcome"
            await remote.aclose()
            await _until(lambda: engine.stats().conversations == 0)
    finally:
        engine.close()


async def _get(url: str, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":")[-1]))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


async def test_a_full_server_is_not_ready_and_refuses_a_conversation_clearly(parts):
    """Prevents a load balancer sending calls to a full engine, and a refused conversation
    from hanging: /ready answers 503 and the refused conversation's turn raises
    AdmissionError; an idle socket is closed so it cannot hold the place for ever."""
    engine = build_engine(parts, max_conversations=1)
    try:
        async with serving(engine, ServerLimits(idle_timeout_s=1.0)) as url:
            assert await _get(url, "/ready") == 200
            remote = RemoteEngine(url, token=TOKEN)
            held = remote.conversation()
            await _until(lambda: engine.stats().conversations == 1)
            assert await _get(url, "/ready") == 503
            late = remote.conversation().speak()
            late.end_text()
            with pytest.raises(AdmissionError):
                await late.__anext__()
            await held.aclose()
            await _until(lambda: engine.stats().conversations == 0)
            assert await _get(url, "/ready") == 200
            async with connect(_ws(url), additional_headers=_auth(), proxy=None) as ws:
                await ws.send(json.dumps({"type": "hello", "versions": [1], "sampling": None,
                                          "voice": None}))
                assert json.loads(await ws.recv())["type"] == "welcome"
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "error"
                assert closed.value.rcvd.code == 1001
            await _until(lambda: engine.stats().conversations == 0)
            await remote.aclose()
    finally:
        engine.close()


async def test_a_signed_client_holds_at_most_its_quota_of_conversations(parts):
    """Prevents one agent process taking every slot of a shared server: its signed token's
    client gets AdmissionError past `max_conversations_per_client`, others (and the operator's
    secret) are unaffected, and a closed conversation gives its place back."""
    from core.server.auth import sign_token

    engine = build_engine(parts)
    limits = ServerLimits(max_conversations_per_client=1)
    try:
        async with serving(engine, limits) as url:
            bot = RemoteEngine(url, token=sign_token(TOKEN, "bot-1", 60))
            other = RemoteEngine(url, token=sign_token(TOKEN, "bot-2", 60))
            first = bot.conversation()
            assert await _say(first.speak(), "Mine.")
            second = bot.conversation()
            with pytest.raises(AdmissionError, match="max_conversations_per_client=1"):
                await _say(second.speak(), "Too many.")
            assert await _say(other.conversation().speak(), "Another client.")
            assert await _say(RemoteEngine(url, token=TOKEN).conversation().speak(), "Operator.")
            await first.aclose()
            assert await _say(second.speak(), "Now there is room.")
            expired = RemoteEngine(url, token=sign_token(TOKEN, "bot-3", 1, now=0))
            with pytest.raises(ProtocolError, match="token"):
                await _say(expired.conversation().speak(), "Too late.")
            for client in (bot, other, expired):
                await client.aclose()
    finally:
        engine.close()
