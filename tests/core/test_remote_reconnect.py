"""A call outlives its socket and its server: `RemoteConversation` reconnects under its
session id, the server that still has the conversation resumes it, and any other server
rebuilds it from the history the client holds (the turns as heard, with their codes)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_kit import build_engine, load_parts
from engine_kit import say_all as _say
from engine_kit import until as _until

from core import SamplingParams, TurnStatus, UserTurn
from core.errors import AdmissionError, ProtocolError, StreamFailed
from core.remote import RemoteEngine
from core.server.run import serving

TOKEN = "test-token-0123456789abcdef"
FRAME_S = 0.08
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def parts(tiny_dirs):
    return load_parts(tiny_dirs)


def _engine_conv(engine):
    """The engine-side record of the one conversation `engine` serves."""
    convs = list(engine._loop.convs.values())
    assert len(convs) == 1, convs
    return convs[0]


async def _cut_reply(conv, played_s: float) -> None:
    """A reply interrupted after two chunks; the listener heard `played_s`."""
    count = len(conv.turns)
    stream = conv.speak()
    stream.push_text("one two three four five six seven eight nine ten " * 3)
    got = 0
    async for _ in stream:
        got += 1
        if got == 2:
            break
    stream.cancel(played_s)
    await stream.wait()
    await _until(lambda: len(conv.turns) == count + 1 and conv.turns[-1].frames == 2)


async def test_a_conversation_is_rebuilt_on_the_next_server_when_its_server_is_gone(parts):
    """Prevents a server restart ending every call: the next reply goes to the other server,
    which holds the same context rows (user speech, replies as heard), and the client says so."""
    first, second = build_engine(parts), build_engine(parts)
    told: list[tuple[str, bool]] = []
    try:
        async with serving(second, token=TOKEN) as url_b:
            async with serving(first, token=TOKEN) as url_a:
                client = RemoteEngine([url_a, url_b], token=TOKEN, reconnect_timeout_s=10,
                                      on_reconnect=lambda c, resumed: told.append((c.server, resumed)))
                conv = client.conversation(sampling=SamplingParams(seed=3))
                speech = (3000 * torch.randn(16000)).to(torch.int16).numpy().tobytes()
                assert await _say(conv.speak(user=UserTurn("Hi.", speech, 16000)), "Hello there.")
                await _cut_reply(conv, 2 * FRAME_S)
                server_a = conv.server
                before = conv.turns
                rows_a = _engine_conv(first).history.rows()
                assert [t.frames for t in conv.history] == [t.frames for t in before]
            first.close()  # the server is gone, its engine with it

            again = SamplingParams(temperature=0.0)
            chunks = await _say(conv.speak(user=UserTurn("Go on."), sampling=again), "Sure.")
            assert chunks and conv.rebuilds == 1 and conv.resumes == 0
            assert conv.server not in (None, server_a) and told == [(conv.server, False)]
            assert conv.turns[:len(before)] == before
            assert [(t.role, t.text) for t in conv.turns[len(before):]] == [
                ("user", "Go on."), ("assistant", "Sure.")]
            rows_b = _engine_conv(second).history.rows()
            assert torch.equal(rows_b[:rows_a.shape[0]], rows_a)
            await client.aclose()
    finally:
        first.close()
        second.close()


async def test_a_dropped_socket_resumes_its_conversation_on_the_same_server(parts):
    """Prevents a network blip costing the cache or the turn in flight's place: the server
    parks the conversation; the reconnect finds it (no second conversation, no rebuild) and a
    reply asked for while the socket was down is sent on the new one."""
    engine = build_engine(parts)
    try:
        async with serving(engine, token=TOKEN) as url:
            client = RemoteEngine(url, token=TOKEN)
            conv = client.conversation(sampling=SamplingParams(seed=4))
            assert await _say(conv.speak(), "First reply.")
            before = conv.turns
            conv._conn.abort()  # the network drops the socket
            await conv._conn.wait_closed()
            stream = conv.speak(user=UserTurn("Still there?"))
            assert await _say(stream, "Yes.")
            assert conv.resumes == 1 and conv.rebuilds == 0
            assert engine.stats().conversations == 1 and engine.stats().kv_rebuilds == 0
            assert conv.turns[:len(before)] == before and conv.turns[-1].text == "Yes."
            await client.aclose()
            await _until(lambda: engine.stats().conversations == 0)
    finally:
        engine.close()


async def test_a_turn_speaking_when_the_socket_drops_fails_and_the_call_goes_on(parts):
    """Prevents a half-delivered turn replaying from its start: it ends with StreamFailed,
    the server keeps what it had sent as heard, and the next reply works."""
    engine = build_engine(parts, max_frames_per_turn=200)
    try:
        async with serving(engine, token=TOKEN) as url:
            client = RemoteEngine(url, token=TOKEN)
            conv = client.conversation(sampling=SamplingParams(seed=5))
            stream = conv.speak()
            stream.push_text("one two three four five six seven eight nine ten " * 4)
            async for _ in stream:
                break
            conv._conn.abort()
            with pytest.raises(StreamFailed, match="lost mid-turn"):
                async for _ in stream:
                    pass
            assert stream.status is TurnStatus.FAILED
            assert await _say(conv.speak(), "Next.")
            roles = [t.role for t in conv.turns]
            assert roles == ["assistant", "assistant"] and conv.turns[0].frames > 0
            assert conv.resumes == 1
            await client.aclose()
    finally:
        engine.close()


async def test_a_second_client_with_the_same_session_takes_over_without_a_fight(parts):
    """Prevents two clients sharing a session id bouncing the conversation between them: the
    newer socket takes it over, the older one ends for good with a clear error."""
    engine = build_engine(parts)
    try:
        async with serving(engine, token=TOKEN) as url:
            old = RemoteEngine(url, token=TOKEN).conversation(session_id="room-1")
            assert await _say(old.speak(), "From the first.")
            new = RemoteEngine(url, token=TOKEN).conversation(session_id="room-1")
            assert await _say(new.speak(), "From the second.")
            assert new.resumes == 1 and [t.text for t in new.turns] == [
                "From the first.", "From the second."]
            await _until(lambda: old._fatal is not None)
            with pytest.raises(ProtocolError, match="took over"):
                old.speak()
            assert engine.stats().conversations == 1
            await new.aclose()
    finally:
        engine.close()


async def test_an_unreachable_server_fails_the_turn_after_the_reconnect_window(parts):
    """Prevents a turn waiting for ever on a server that never comes back."""
    client = RemoteEngine("http://127.0.0.1:9", token=TOKEN, reconnect_timeout_s=0.5)
    conv = client.conversation()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(StreamFailed, match="no engine server answered"):
        await _say(conv.speak(), "Hello.")
    assert loop.time() - start < 5
    await client.aclose()


async def test_a_reply_a_full_server_refused_gives_its_user_turns_to_the_next(parts):
    """Prevents losing what the user said when the server is full: the refused reply ends
    with AdmissionError, and its user turns go to the server with the next reply."""
    engine = build_engine(parts, max_conversations=1)
    try:
        async with serving(engine, token=TOKEN) as url:
            client = RemoteEngine(url, token=TOKEN)
            holder = client.conversation()
            assert await _say(holder.speak(), "I hold the only slot.")
            conv = client.conversation()
            refused = conv.speak(user=UserTurn("Are you there?"))
            with pytest.raises(AdmissionError):
                await _say(refused, "Yes.")
            await holder.aclose()
            await _until(lambda: engine.stats().conversations == 0)
            assert await _say(conv.speak(user=UserTurn("Hello?")), "Hi.")
            assert [(t.role, t.text) for t in conv.turns] == [
                ("user", "Are you there?"), ("user", "Hello?"), ("assistant", "Hi.")]
            await client.aclose()
    finally:
        engine.close()
