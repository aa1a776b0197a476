"""`moss_livekit.TTS` over the network: a real AgentSession speaking through
`core.remote.RemoteEngine` to the engine behind `create_app` on a loopback port."""

from __future__ import annotations

import asyncio

import pytest
from lk_kit import assistant_messages, make_session, new_agent, wait_until

import moss_livekit
from core.remote import RemoteConversation, RemoteEngine
from core.server.run import serving
from moss_livekit import TTS

TOKEN = "lk-remote-token-0123456789abcdef"
FRAME_S = 0.08
LONG_REPLY = (
    "Let me tell you a rather long story about a lighthouse keeper who counted ships every "
    "night, wrote their names in a book, and never once missed a single evening of work."
)
pytestmark = pytest.mark.timeout(180)


def _roles(conv) -> list[str]:
    return [t.role for t in conv.turns]


async def test_two_turns_then_a_barge_in_over_the_remote_engine(engine) -> None:
    """Prevents the plugin working only in process: over the wire the replies are conditioned on
    the dialogue so far, and after a barge-in the server's turn (like the chat history) stops
    where playback stopped, before the next reply."""
    async with serving(engine, token=TOKEN) as url:
        remote = RemoteEngine(url, token=TOKEN)
        plugin = TTS(engine=remote)
        assert plugin.engine is remote
        session, _, audio, text_out = make_session(
            plugin, ["Hi! Nice to meet you.", "Sure, happy to help.", LONG_REPLY,
                     "Okay, moving on."], speed=1.0, token_delay_s=0.06,
        )
        await session.start(new_agent())
        try:
            # two turns, conditioned on each other (as test_two_turns_conditioned_on_each_other)
            await asyncio.wait_for(session.run(user_input="Hello there"), 60)
            await asyncio.wait_for(session.run(user_input="Can you help me?"), 60)
            conv = plugin.conversation(session)
            assert isinstance(conv, RemoteConversation)
            # the server's snapshot of the history arrives after each change
            await wait_until(lambda: len(conv.turns) == 4 and conv.turns[-1].frames > 0,
                             limit_s=10.0)
            turns = conv.turns
            assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
            assert turns[0].text == "Hello there" and turns[2].text == "Can you help me?"
            assert all(t.frames > 0 for t in turns if t.role == "assistant")
            said = [m.text_content for m in assistant_messages(session)]
            assert said == ["Hi! Nice to meet you.", "Sure, happy to help."]
            assert not any(m.interrupted for m in assistant_messages(session))
            assert len(audio.finished) == 2 and not any(i for _, i in audio.finished)
            assert "Sure, happy to help." in text_out.text

            # a barge-in mid-reply (as test_interrupt_keeps_only_what_was_heard)
            handle = session.generate_reply(user_input="Tell me a story")
            await wait_until(lambda: audio.segment_started.is_set())
            await wait_until(lambda: audio._played_s() >= 1.2)  # a few words were heard
            await session.interrupt()
            await asyncio.wait_for(handle, 30)
            position, interrupted = audio.finished[-1]
            assert interrupted and position >= 1.2
            message = assistant_messages(session)[-1]
            assert message.interrupted
            heard = (message.text_content or "").strip()
            assert heard and LONG_REPLY.startswith(heard) and len(heard) < len(LONG_REPLY)

            await wait_until(
                lambda: len(conv.turns) == 6 and conv.turns[-1].role == "assistant"
                and conv.turns[-1].frames * FRAME_S <= position + FRAME_S,
                limit_s=5.0,
            )
            last = conv.turns[-1]
            assert last.frames > 0
            kept = last.text.strip()
            assert kept and LONG_REPLY.startswith(kept) and len(kept) < len(LONG_REPLY)

            await asyncio.wait_for(session.run(user_input="Never mind"), 60)
            await wait_until(lambda: len(conv.turns) == 8 and conv.turns[-1].frames > 0,
                             limit_s=10.0)
            assert _roles(conv) == ["user", "assistant"] * 4
            assert conv.turns[-2].text == "Never mind"
            assert assistant_messages(session)[-1].text_content == "Okay, moving on."
        finally:
            await session.aclose()
            await audio.aclose()
            await plugin.aclose()
            await remote.aclose()


def test_worker_load_is_refused_clearly_for_a_remote_engine() -> None:
    """Prevents an AttributeError deep in LiveKit's load_fnc: a remote engine has no stats()
    (its load is the server's, on /metrics), so the occupancy helpers refuse it by name."""
    remote = RemoteEngine("http://127.0.0.1:9", token=TOKEN)
    with pytest.raises(TypeError, match="RemoteEngine has no stats"):
        moss_livekit.engine_occupancy(remote)
    with pytest.raises(TypeError, match="RemoteEngine has no stats"):
        moss_livekit.register_engine(remote)
    with pytest.raises(TypeError, match="RemoteEngine"):
        TTS(engine="http://127.0.0.1:9")  # type: ignore[arg-type]
    remote.close()
