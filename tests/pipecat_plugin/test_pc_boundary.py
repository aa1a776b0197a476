"""Bad input and odd timing at the service boundary: each gets a precise error or a clean end, and
the shared engine keeps serving (no slot or conversation left behind)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from moss_pc_support import (
    RealtimeSpeaker,
    Recorder,
    audio_frames,
    llm_turn,
    run_pipeline,
    tokens_of,
    wait_for,
)
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    InterruptionFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TextFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.tests.utils import SleepFrame, run_test

from moss_pipecat import MossTTSService

# A small text limit so "huge" LLM replies are cheap to produce.
ENGINE_OVERRIDES = {"max_text_chars": 120, "max_streams": 2}
SR = 24000
FRAME_S = 0.08  # one codec frame
# Long enough that the tiny model speaks up to the module's 40-frame cap (3.2 s).
REPLY = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen."


def _errors(up) -> list[str]:
    return [f.error for f in up if isinstance(f, ErrorFrame)]


async def _idle(engine) -> None:
    """The engine has no stream left generating (they end on its own thread)."""
    await wait_for(lambda: engine.stats().active_streams == 0 and engine.stats().queued_turns == 0)


async def test_huge_streamed_reply_is_cut_once_and_the_call_goes_on(engine) -> None:
    """An LLM reply longer than the engine's per-turn limit must speak what fits, report ONE
    precise error, and not reopen a second engine turn for the rest of the same reply."""
    before = engine.stats().turns_started
    tts = MossTTSService(engine=engine)
    words = tokens_of(" ".join(["word"] * 60))  # ~300 characters, in deltas
    down, up = await run_test(tts, frames_to_send=[*llm_turn(*words), *llm_turn("Ok.")])
    errors = _errors(up)
    assert len(errors) == 1 and "max_text_chars" in errors[0], errors
    assert engine.stats().turns_started - before == 2, "one engine turn per reply"
    assert [t.role for t in tts.conversation.turns] == ["assistant", "assistant"]
    assert tts.conversation.turns[1].text == "Ok."
    assert sum(isinstance(f, TTSStoppedFrame) for f in down) == 2
    await _idle(engine)


@pytest.mark.parametrize(
    "text",
    [
        "\ud83d half a surrogate pair.",  # what a broken decoder hands on
        "Null\x00 and bell\x07 characters.",
        "\u202eright-to-left override\u202c and zero\u200bwidth.",
        "e\u0301\u0301\u0301 combining marks, 👩‍👩‍👧 and ﷽.",
    ],
)
async def test_odd_unicode_never_breaks_the_call(engine, text) -> None:
    """Odd Unicode from an LLM (lone surrogates, control characters, bidi marks, combining
    marks) must end the turn cleanly and leave the engine serving the next reply."""
    tts = MossTTSService(engine=engine)
    down, up = await run_test(
        tts, frames_to_send=[*llm_turn(*tokens_of(text)), SleepFrame(0.05), *llm_turn("Fine.")]
    )
    kinds = [type(f) for f in down]
    assert kinds.count(TTSStartedFrame) == kinds.count(TTSStoppedFrame) == 2
    last_stop = [f for f in down if isinstance(f, TTSStoppedFrame)][-1]
    assert audio_frames(down)[-1].context_id == last_stop.context_id, "the next reply speaks"
    await _idle(engine)


async def test_full_engine_is_a_precise_error_and_later_turns_speak(engine) -> None:
    """When every slot of the shared engine is speaking, each reply must fail at once with one
    error naming the limit (no hang, no second "no audio" error), and the same service must
    speak again once a slot is free: a full engine is temporary, not a dead provider (three
    failed replies once wrote the service off for the rest of the call)."""
    blockers = [engine.conversation() for _ in range(engine.config.max_streams)]
    turns = [conv.speak() for conv in blockers]
    for turn in turns:
        turn.push_text("Holding a slot")
    tts = MossTTSService(engine=engine)
    before, after = Recorder(), Recorder()

    async def driver(worker) -> None:
        for i in range(3):
            await worker.queue_frames(llm_turn(*tokens_of("Are you there?")))
            await wait_for(lambda i=i: len(_errors(f for _, f in before.up)) > i)
        for turn in turns:
            turn.cancel()
        await worker.queue_frames(llm_turn(*tokens_of("Now I can.")))
        await wait_for(lambda: bool(after.frames(TTSStoppedFrame)) and audio_frames(after.frames()))
        await worker.queue_frame(EndFrame())

    try:
        await run_pipeline([before, tts, after], driver)
    finally:
        for turn in turns:
            turn.cancel()
        for conv in blockers:
            conv.close()
    errors = _errors(f for _, f in before.up)
    assert len(errors) == 3 and all("max_streams" in e for e in errors), errors
    assert tts.is_usable and audio_frames(after.frames())
    await _idle(engine)


async def test_a_bare_text_frame_is_spoken_and_does_not_hold_the_next_reply(engine) -> None:
    """Prevents: a TextFrame pushed outside an LLM response opening an engine turn that nothing
    ends, which muted every later reply until the engine's text timeout (120 s)."""
    tts = MossTTSService(engine=engine)
    rec = Recorder()

    async def driver(worker) -> None:
        await worker.queue_frames([TextFrame("Hello there.")])
        await worker.queue_frames(llm_turn(*tokens_of("A normal reply.")))
        await wait_for(lambda: len({f.context_id for f in rec.frames(TTSStoppedFrame)}) >= 2,
                       limit_s=15.0)
        await worker.queue_frame(EndFrame())

    await run_pipeline([tts, rec], driver)
    spoken = {f.context_id for f in audio_frames(rec.frames())}
    assert len(spoken) == 2, "both the bare text and the reply were spoken"
    await _idle(engine)


async def test_unusable_voice_file_is_reported_and_the_call_still_speaks(engine, tmp_path) -> None:
    """A broken or silent reference recording must produce one error naming the file and the
    reply must still be spoken (without a voice prompt) instead of the bot going mute."""
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    silent = tmp_path / "silent.wav"
    import soundfile as sf

    sf.write(silent, np.zeros(24000 * 3, dtype=np.float32), 24000)
    for path in (broken, silent):
        tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(voice=str(path)))
        down, up = await run_test(tts, frames_to_send=llm_turn("Hello", " there."))
        errors = _errors(up)
        assert errors and all(path.name in e for e in errors), errors
        assert audio_frames(down), "spoken without the voice prompt"
        assert tts.conversation.voice is None
    await _idle(engine)


async def test_interruption_before_first_audio(engine) -> None:
    """A barge-in right after the reply started (no audio yet) must cancel the engine turn,
    emit no audio for it, and let the next reply play."""
    tts = MossTTSService(engine=engine)
    frames = [
        LLMFullResponseStartFrame(),
        LLMTextFrame("Well"),
        SleepFrame(0.01),
        InterruptionFrame(),
        SleepFrame(0.2),
        *llm_turn("Yes?"),
    ]
    cancelled = engine.stats().turns_cancelled
    down, up = await run_test(tts, frames_to_send=frames)
    assert not _errors(up)
    audio_ctx = {f.context_id for f in audio_frames(down)}
    assert len(audio_ctx) == 1 and tts._latest.context_id in audio_ctx
    assert engine.stats().turns_cancelled - cancelled == 1
    # Nothing of the interrupted reply was heard, so nothing of it stays in the context.
    assert [t.text for t in tts.conversation.turns] == ["Yes?"]
    await _idle(engine)


async def test_interruption_during_llm_pause(engine) -> None:
    """A barge-in while the LLM is paused mid-reply (tool call) must cancel the waiting engine
    turn; its slot must be free afterwards."""
    tts = MossTTSService(engine=engine)
    frames = [
        LLMFullResponseStartFrame(),
        # Fewer tokens than the model's 12-token lead: the engine turn is certainly still
        # waiting for text (not finished by chance) when the barge-in comes.
        *(LLMTextFrame(t) for t in tokens_of("Let me check.")),
        SleepFrame(0.5),  # the tool call
        InterruptionFrame(),
        SleepFrame(0.1),
        *llm_turn("Done."),
    ]
    cancelled = engine.stats().turns_cancelled
    down, up = await run_test(tts, frames_to_send=frames)
    assert not _errors(up)
    assert engine.stats().turns_cancelled - cancelled == 1
    assert [t.text for t in tts.conversation.turns] == ["Done."]
    await _idle(engine)


async def test_pipeline_end_releases_the_conversation(engine) -> None:
    """A finished call must give its conversation slot back to the shared engine, or a busy
    server runs out of conversations after max_conversations calls."""
    before = engine.stats().conversations
    tts = MossTTSService(engine=engine)
    await run_test(tts, frames_to_send=llm_turn("Bye."))
    await wait_for(lambda: engine.stats().conversations == before)
    assert tts.conversation.closed


async def test_interruption_after_generation_finished_cuts_to_what_was_played(engine) -> None:
    """The engine finished the reply long before the speaker did; a barge-in then must still cut
    the conversation's turn to the audio actually played, or the next reply continues from
    words the caller never heard."""
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(seed=2))
    speaker = RealtimeSpeaker(SR)
    marks: dict[str, float] = {}

    def played() -> float:
        return sum(len(w.audio) for w in speaker.written if w.kind == "TTSAudioRawFrame") / (2 * SR)

    async def driver(worker) -> None:
        await worker.queue_frames(llm_turn(*tokens_of(REPLY)))
        await wait_for(lambda: tts._latest is not None and tts._latest.done.is_set())
        turn = tts._latest
        await wait_for(lambda: played() >= 0.5)
        marks["heard"] = played()
        marks["pushed"] = tts._playout.pushed_s(turn.context_id)  # handed to the transport
        await worker.queue_frame(InterruptionFrame())
        await wait_for(lambda: engine.stats().active_streams == 0)
        await worker.queue_frame(EndFrame())

    await run_pipeline([tts, speaker], driver, sample_rate=SR)
    # The tiny model generates several times faster than real time, so the reply must have been
    # handed over well ahead of playback; otherwise this test did not test its scenario.
    assert marks["pushed"] >= marks["heard"] + 0.3, ("generation did not run ahead", marks)
    assert len(tts.conversation.turns) == 1
    await wait_for(lambda: tts.conversation.turns[0].frames * FRAME_S <= marks["heard"] + FRAME_S)
    turn = tts.conversation.turns[0]
    assert turn.frames * FRAME_S >= marks["heard"] - 2 * FRAME_S, (turn, marks)
    assert turn.frames * FRAME_S < marks["pushed"] - FRAME_S, "cut, not kept whole"


async def test_unexpected_engine_failure_is_an_error_frame(engine, monkeypatch) -> None:
    """A bug-type failure inside a turn (not one of the engine's own errors) must still become an
    ErrorFrame and end the turn at once, not a silently dead task and a stalled audio context."""
    tts = MossTTSService(engine=engine)
    await run_test(tts, frames_to_send=llm_turn("Warm", " up."))  # opens the conversation
    conv_cls = type(tts.conversation)

    def broken(self, **request):
        raise RuntimeError("device lost")

    monkeypatch.setattr(conv_cls, "speak", broken)
    tts = MossTTSService(engine=engine, stop_frame_timeout_s=30.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    down, up = await run_test(tts, frames_to_send=llm_turn("Hello", " there."))
    assert any("device lost" in e for e in _errors(up)), _errors(up)
    assert sum(isinstance(f, TTSStoppedFrame) for f in down) == 1
    assert loop.time() - started < 10.0, "the turn ended at once, not by Pipecat's timeout"


async def test_voice_file_at_another_rate_in_stereo_is_used(engine, tmp_path) -> None:
    """Reference recordings come at 44.1 kHz stereo from most tools; the voice must be used
    (resampled, downmixed), not refused."""
    import soundfile as sf

    t = np.arange(int(44100 * 3)) / 44100
    wave = 0.3 * np.sin(2 * np.pi * 170 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    path = tmp_path / "studio.wav"
    sf.write(path, np.stack([wave, 0.8 * wave], axis=1).astype(np.float32), 44100)
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(voice=str(path)))
    down, up = await run_test(tts, frames_to_send=llm_turn("Hello", " there."))
    assert not _errors(up) and audio_frames(down)
    voice = tts.conversation.voice
    assert voice is not None and voice.duration_s == pytest.approx(3.0, abs=0.1)


@pytest.mark.timeout(60)
async def test_end_frame_during_an_open_reply_finishes_it_promptly(engine) -> None:
    """A pipeline ended (EndFrame) while an LLM reply is still open must speak what it got and
    shut down at once, not hang until the engine gives up waiting for more text."""
    tts = MossTTSService(engine=engine)
    loop = asyncio.get_running_loop()
    started = loop.time()
    down, up = await run_test(
        tts, frames_to_send=[LLMFullResponseStartFrame(), LLMTextFrame("Goodbye for now")]
    )
    assert loop.time() - started < 15.0
    assert not _errors(up)
    assert sum(isinstance(f, TTSStoppedFrame) for f in down) == 1
    assert [t.text for t in tts.conversation.turns] == ["Goodbye for now"]


async def test_no_free_conversation_is_a_precise_error(engine) -> None:
    """A call arriving when the engine holds max_conversations must be told so (an error naming
    the limit at start and for its reply), never hang, and work in a later call."""
    taken = []
    try:
        while engine.stats().conversations < engine.config.max_conversations:
            taken.append(engine.conversation())
        tts = MossTTSService(engine=engine)
        down, up = await run_test(tts, frames_to_send=llm_turn("Hello."))
        errors = _errors(up)
        assert errors and "max_conversations" in errors[0], errors
        assert tts.conversation is None and not audio_frames(down)
    finally:
        for conv in taken:
            conv.close()
    tts = MossTTSService(engine=engine)
    down, up = await run_test(tts, frames_to_send=llm_turn("Hello."))
    assert audio_frames(down) and not _errors(up)


async def test_service_built_from_paths_owns_and_closes_its_engine(tiny_dirs) -> None:
    """`MossTTSService(model=..., codec=...)` must speak and, when the pipeline ends, stop the
    engine it built (its thread and memory), without blocking the event loop."""
    model_dir, codec_dir = tiny_dirs
    tts = MossTTSService(model=str(model_dir), codec=str(codec_dir))
    down, up = await run_test(tts, frames_to_send=llm_turn("Hello", " there."))
    assert audio_frames(down) and not _errors(up)
    assert tts.engine.closed
