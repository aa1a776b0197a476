"""`moss_livekit.TTS` inside a real AgentSession: scripted streaming LLM, real-time audio sink,
TranscriptSynchronizer, tiny checkpoint, no LiveKit server."""

from __future__ import annotations

import asyncio
import threading
import time

from livekit.agents import FlushSentinel
from livekit.agents import tts as lk_tts
from livekit.agents.voice import Agent, SpeechHandle
from livekit.agents.voice.events import UserInputTranscribedEvent, UserStateChangedEvent
from livekit.agents.voice.io import PlaybackFinishedEvent
from lk_kit import (
    ToneInput,
    assistant_messages,
    make_session,
    new_agent,
    stream_in_speech,
    wait_until,
)

from moss_livekit import TTS

FRAME_S = 0.08
LONG_REPLY = (
    "Let me tell you a rather long story about a lighthouse keeper who counted ships every "
    "night, wrote their names in a book, and never once missed a single evening of work."
)


def _roles(tts: TTS, session) -> list[str]:
    return [t.role for t in tts.conversation(session).turns]


async def test_two_turns_conditioned_on_each_other(engine) -> None:
    """Prevents: each reply being spoken without the dialogue so far (the model loses prosody
    and context) or the user's words never reaching the conversation."""
    plugin = TTS(engine=engine)
    session, scripted, audio, text_out = make_session(
        plugin, ["Hi! Nice to meet you.", "Sure, happy to help."], speed=4.0
    )
    await session.start(new_agent())
    try:
        await session.run(user_input="Hello there")
        await session.run(user_input="Can you help me?")
        conv = plugin.conversation(session)
        turns = conv.turns
        assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
        assert turns[0].text == "Hello there" and turns[2].text == "Can you help me?"
        assert all(t.frames > 0 for t in turns if t.role == "assistant")
        said = [m.text_content for m in assistant_messages(session)]
        assert said == ["Hi! Nice to meet you.", "Sure, happy to help."]
        assert not any(m.interrupted for m in assistant_messages(session))
        assert len(audio.finished) == 2 and not any(i for _, i in audio.finished)
        assert "Sure, happy to help." in text_out.text  # the aligned transcript reached the room
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


async def test_interrupt_keeps_only_what_was_heard(engine) -> None:
    """Prevents: after a barge-in, the next reply continuing from words the user never heard
    (chat history and TTS context must both stop where playback stopped)."""
    plugin = TTS(engine=engine)
    # the LLM is still streaming when the user barges in (the text runs ahead of the audio)
    session, _, audio, _ = make_session(
        plugin, [LONG_REPLY, "Okay, moving on."], speed=1.0, token_delay_s=0.06
    )
    await session.start(new_agent())
    try:
        handle = session.generate_reply(user_input="Tell me a story")
        await wait_until(lambda: audio.segment_started.is_set())
        await wait_until(lambda: audio._played_s() >= 1.2)  # a few words were heard
        await session.interrupt()
        await handle
        position, interrupted = audio.finished[-1]
        assert interrupted and position >= 1.2
        message = assistant_messages(session)[-1]
        assert message.interrupted
        heard = (message.text_content or "").strip()
        assert heard and LONG_REPLY.startswith(heard) and len(heard) < len(LONG_REPLY)

        conv = plugin.conversation(session)  # the engine applies the cut on its own thread
        await wait_until(
            lambda: conv.turns[-1].role == "assistant"
            and conv.turns[-1].frames * FRAME_S <= position + FRAME_S,
            limit_s=5.0,
        )
        last = conv.turns[-1]
        assert last.frames > 0
        kept = last.text.strip()
        assert kept and LONG_REPLY.startswith(kept) and len(kept) < len(LONG_REPLY)

        await session.run(user_input="Never mind")
        assert _roles(plugin, session)[-2:] == ["user", "assistant"]
        assert assistant_messages(session)[-1].text_content == "Okay, moving on."
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


class TwoSegmentAgent(Agent):
    """An agent whose reply is spoken as two segments (`FlushSentinel` between them): LiveKit
    synthesises segment 2 while segment 1 is still playing."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(instructions="You speak in segments.")
        self.segments = (first, second)

    async def llm_node(self, chat_ctx, tools, model_settings):  # noqa: ANN001, ANN201
        first, second = self.segments
        for word in first.split(" "):
            yield word + " "
        yield FlushSentinel()
        for word in second.split(" "):
            yield word + " "


async def _segments_then_interrupt(plugin: TTS, agent: TwoSegmentAgent, *, after_first: bool,
                                   at_s: float):
    """Start a two-segment reply, interrupt it `at_s` into segment 1 (or into segment 2 once
    segment 1 played in full); returns (session, audio, position, conversation)."""
    session, _, audio, _ = make_session(plugin, [], speed=1.0)
    await session.start(agent)
    handle = session.generate_reply(user_input="go")
    await wait_until(lambda: audio.segment_started.is_set())
    room = plugin._rooms[session]
    await wait_until(lambda: len(room._records) >= 2 and room._records[0].emitted_s > 1.0)
    if after_first:
        await wait_until(lambda: len(audio.finished) >= 1 and audio.segment_started.is_set())
    await wait_until(lambda: audio._played_s() >= at_s)
    await session.interrupt()
    await handle
    return session, audio, audio.finished[-1][0], plugin.conversation(session)


async def test_a_segment_interrupted_while_the_next_is_ready_is_cut_and_the_next_dropped(
    engine,
) -> None:
    """Prevents: a reply in two segments interrupted during segment 1 leaving all of segment 1
    and the never-played segment 2 in the conversation (the model would continue from audio
    the user never heard)."""
    plugin = TTS(engine=engine)
    first = "The first segment is rather long so that it plays for a while before anything else."
    agent = TwoSegmentAgent(first, "Second segment words.")
    session, audio, position, conv = await _segments_then_interrupt(
        plugin, agent, after_first=False, at_s=0.8
    )
    try:
        await wait_until(lambda: _roles(plugin, session) == ["user", "assistant"]
                         and conv.turns[-1].frames * FRAME_S <= position + FRAME_S, limit_s=5.0)
        kept = conv.turns[-1]
        assert kept.frames > 0 and first.startswith(kept.text.strip())
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


async def test_a_segment_played_in_full_is_kept_and_the_interrupted_next_one_cut(engine) -> None:
    """Prevents: segment 1's playback_finished being credited to segment 2 (then marked heard in
    full while the real cut is dropped)."""
    plugin = TTS(engine=engine)
    first = "A medium first part that lasts a little while."
    second = "And now the second segment is rather long so that it plays for a while."
    session, audio, position, conv = await _segments_then_interrupt(
        plugin, TwoSegmentAgent(first, second), after_first=True, at_s=0.6
    )
    try:
        full = audio.finished[0][0]
        await wait_until(lambda: len(conv.turns) == 3
                         and conv.turns[-1].frames * FRAME_S <= position + FRAME_S, limit_s=5.0)
        one, two = conv.turns[1], conv.turns[2]
        assert one.frames * FRAME_S >= full - FRAME_S and one.text.strip() == first
        assert 0 < two.frames * FRAME_S < 3.0 and second.startswith(two.text.strip())
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


async def test_a_restarted_session_speaks_with_a_fresh_conversation(engine) -> None:
    """Prevents: a session closed and started again getting 'this TTS was closed' for good
    (the closed room stayed bound to the session)."""
    plugin = TTS(engine=engine)
    session, _, audio, _ = make_session(plugin, ["One.", "Two."], speed=4.0)
    await session.start(new_agent())
    try:
        await session.run(user_input="hi")
        first = plugin.conversation(session)
        await session.aclose()
        session.output.audio = audio  # closing detached the output
        segments = len(audio.segments)
        await session.start(new_agent())
        await session.run(user_input="again")
        assert len(audio.segments) > segments
        second = plugin.conversation(session)
        assert second is not first and [t.role for t in second.turns][-1] == "assistant"
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


async def test_engine_error_is_a_tts_error_and_the_session_continues(engine) -> None:
    """Prevents: one failed turn (here: text over the engine's limit) killing the session or
    leaving a half turn in the conversation, instead of an error event and a working next reply."""
    plugin = TTS(engine=engine)
    too_long = "x" * (engine.config.max_text_chars + 10)  # one delta: fails before any audio
    session, _, audio, _ = make_session(plugin, [too_long, "All good now."], speed=4.0)
    errors: list = []
    session.on("error", lambda ev: errors.append(ev.error))
    await session.start(new_agent())
    try:
        await session.run(user_input="Say a lot")
        assert any(isinstance(e, lk_tts.TTSError) for e in errors)
        await session.run(user_input="Try again")
        assert assistant_messages(session)[-1].text_content == "All good now."
        roles = _roles(plugin, session)
        assert roles.count("assistant") == 1 and roles[-1] == "assistant"
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


async def test_say_and_handoff_keep_one_conversation(engine) -> None:
    """Prevents: `session.say()` or an agent handoff starting a fresh TTS context (the new
    agent's first words would ignore everything said before)."""
    plugin = TTS(engine=engine)
    session, _, audio, _ = make_session(plugin, ["First answer."], speed=4.0)
    await session.start(new_agent())
    try:
        await session.say("Welcome to the demo.")
        await session.run(user_input="Hi")
        conv = plugin.conversation(session)
        session.update_agent(Agent(instructions="You are the second agent."))
        await session.say("The second agent speaks now.")
        assert plugin.conversation(session) is conv
        assert [t.role for t in conv.turns] == ["assistant", "user", "assistant", "assistant"]
        assert conv.turns[-1].text.strip() == "The second agent speaks now."
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


async def test_discarded_reply_leaves_no_trace(engine) -> None:
    """Prevents: a reply synthesized ahead (preemptive generation) and then discarded, never
    played, being remembered as if the user had heard it."""
    plugin = TTS(engine=engine)
    session, _, audio, _ = make_session(plugin, ["Played reply."], speed=4.0)
    await session.start(new_agent())
    try:
        await session.run(user_input="Hi")
        before = plugin.conversation(session).turns
        speech = SpeechHandle.create()  # a preemptive reply, dropped before it is played
        stream = stream_in_speech(plugin, session, speech)
        stream.push_text("A guess that nobody will hear.")
        stream.end_input()
        frames = [ev async for ev in stream]
        await stream.aclose()
        assert frames
        speech._mark_done()
        conv = plugin.conversation(session)
        await wait_until(lambda: conv.turns == before)
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


def test_eight_sessions_in_threads_share_one_engine(engine) -> None:
    """Prevents: LiveKit's THREAD executor (one event loop per room) breaking the shared engine,
    or rooms mixing their conversations."""
    results: dict[int, list[str]] = {}
    failures: list[BaseException] = []

    async def room(i: int) -> None:
        plugin = TTS(engine=engine)
        session, _, audio, _ = make_session(plugin, [f"Reply number {i}."], speed=4.0)
        await session.start(new_agent())
        try:
            await session.run(user_input=f"Hello from room {i}")
            turns = plugin.conversation(session).turns
            results[i] = [t.text.strip() for t in turns]
        finally:
            await session.aclose()
            await audio.aclose()
            await plugin.aclose()

    def run(i: int) -> None:
        try:
            asyncio.run(room(i))
        except BaseException as exc:  # reported below, on the test thread
            failures.append(exc)

    before = engine.stats().conversations
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    assert sorted(results) == list(range(8))
    for i, texts in results.items():
        assert texts == [f"Hello from room {i}", f"Reply number {i}."]
    # every room gave its conversation back to the shared engine (closed on its own thread)
    deadline = time.monotonic() + 10
    while engine.stats().conversations != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().conversations == before and engine.stats().active_streams == 0


async def test_preemptive_reply_speaks_after_the_final_transcript(engine) -> None:
    """Prevents: a reply synthesized preemptively (before LiveKit commits the user message)
    being generated without the user's words, or those words being added twice later."""
    plugin = TTS(engine=engine)
    session, _, audio, _ = make_session(plugin, ["It is noon."], speed=4.0)
    await session.start(new_agent())
    try:
        plugin.attach(session)
        session.emit(
            "user_input_transcribed",
            UserInputTranscribedEvent(transcript="What time is it", is_final=True),
        )
        speech = SpeechHandle.create()
        stream = stream_in_speech(plugin, session, speech)
        stream.push_text("Let me check.")
        stream.end_input()
        assert [ev async for ev in stream]
        await stream.aclose()
        conv = plugin.conversation(session)
        assert [(t.role, t.text) for t in conv.turns][:1] == [("user", "What time is it")]
        speech._mark_done()  # the preemptive reply is dropped unplayed
        await wait_until(lambda: [t.role for t in conv.turns] == ["user"])

        await session.run(user_input="What time is it")  # LiveKit commits the same words
        assert [(t.role, t.text.strip()) for t in conv.turns] == [
            ("user", "What time is it"),
            ("assistant", "It is noon."),
        ]
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


async def test_user_speech_reaches_the_conversation(engine) -> None:
    """Prevents: the model hearing only the transcript of the user, never their voice (tone and
    pace of the user turn condition the reply), when VAD and audio input are present."""
    plugin = TTS(engine=engine)
    session, _, audio, _ = make_session(plugin, ["I heard you."], speed=4.0)
    mic = ToneInput()
    session.input.audio = mic
    await session.start(new_agent())
    try:
        plugin.attach(session)
        session.emit("user_state_changed", UserStateChangedEvent(old_state="listening",
                                                                 new_state="speaking"))
        start = mic.frames
        await wait_until(lambda: mic.frames - start >= 30)  # 0.6 s of speech went by
        session.emit("user_state_changed", UserStateChangedEvent(old_state="speaking",
                                                                 new_state="listening"))
        await session.run(user_input="Hello")
        user = plugin.conversation(session).turns[0]
        assert user.role == "user" and user.text == "Hello"
        assert 0.4 <= user.frames * FRAME_S <= 2.0  # the tapped speech, encoded by the codec
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()


async def test_playback_position_after_the_cancel_still_cuts_the_turn(engine) -> None:
    """Prevents: losing the cut when LiveKit reports the playback position only after it has
    cancelled the stream (the turn would keep audio the user never heard)."""
    plugin = TTS(engine=engine)
    session, _, audio, _ = make_session(plugin, [], speed=4.0)
    await session.start(new_agent())
    try:
        speech = SpeechHandle.create()
        stream = stream_in_speech(plugin, session, speech)
        stream.push_text(LONG_REPLY)  # text not ended: the stream stays open like a live reply
        got = 0.0
        async for ev in stream:  # LiveKit reads frames until it cancels the stream
            got += ev.frame.duration
            if got >= 0.8:
                break
        await stream.aclose()  # the cancel comes first ...
        conv = plugin.conversation(session)
        await wait_until(lambda: bool(conv.turns) and conv.turns[-1].frames * FRAME_S >= 0.8)
        session.output.audio.emit(  # ... then the position the audio output reached
            "playback_finished", PlaybackFinishedEvent(playback_position=0.3, interrupted=True)
        )
        await wait_until(lambda: conv.turns[-1].frames * FRAME_S <= 0.3 + 1e-6, limit_s=5.0)
        assert conv.turns[-1].role == "assistant" and conv.turns[-1].frames > 0
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()
