"""Barge-in through a real-time output transport: what is played, kept and cancelled."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from moss_pc_support import (
    RealtimeSpeaker,
    Recorder,
    llm_turn,
    run_pipeline,
    tokens_of,
    wait_for,
)
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.tests.utils import SleepFrame, run_test

from moss_pipecat import MossTTSService

LONG = "One two three. Four five six. Seven eight nine. Ten eleven twelve. Thirteen fourteen."
SR = 24000
# Paced like production, so the barge-in lands while the turn is still generating.
ENGINE_OVERRIDES = {"lead_s": 0.5}


async def test_interruption_mid_turn(engine) -> None:
    """After a barge-in no audio of the dead turn may reach the speaker (only a few-ms fade),
    the engine stream must be cancelled at the played position, the LLM context must hold only
    the words that were played, and the next turn must play normally."""
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(seed=1))
    rec = Recorder()
    speaker = RealtimeSpeaker(SR)
    context = LLMContext()
    _, assistant = LLMContextAggregatorPair(context)
    marks: dict[str, float] = {}

    def tts_seconds() -> float:
        return sum(len(w.audio) for w in speaker.written if w.kind == "TTSAudioRawFrame") / (2 * SR)

    async def driver(worker) -> None:
        await worker.queue_frames(llm_turn(*tokens_of(LONG)))
        await wait_for(lambda: tts_seconds() >= 0.6)
        first = tts._latest
        marks["clock"] = tts.get_clock().get_time()
        marks["heard"] = tts_seconds()
        marks["t"] = asyncio.get_running_loop().time()
        await worker.queue_frame(InterruptionFrame())
        await wait_for(lambda: first.done.is_set() and first.cancelled)
        marks["played"] = first.played_s
        await asyncio.sleep(0.3)  # observation window: nothing of the dead turn may follow
        marks["n_after_window"] = len(speaker.written)
        await worker.queue_frames(llm_turn("Sure.", " Go", " ahead."))
        await wait_for(lambda: tts._latest is not first and tts._latest.done.is_set())
        await worker.queue_frame(EndFrame())

    await run_pipeline([tts, rec, speaker, assistant], driver, sample_rate=SR)

    # After the transport got the interruption, only one short fade may be written, behind at most
    # the one 40 ms chunk Pipecat's audio task may already have dequeued (test_interruption_race).
    (cut,) = speaker.interrupted_at
    after = speaker.written[cut : marks["n_after_window"]]
    if after and after[0].kind == "TTSAudioRawFrame" and len(after[0].audio) <= 2 * int(0.04 * SR):
        after = after[1:]
    assert [w.kind for w in after] in ([], ["OutputAudioRawFrame"]), "dead turn kept playing"
    if after:
        fade = np.frombuffer(after[0].audio, dtype=np.int16)
        assert len(fade) <= int(0.04 * SR) and not fade[int(0.01 * SR) :].any()
    # The engine turn was cut where the listener was.
    assert abs(marks["played"] - marks["heard"]) < 0.25, marks
    # The assistant context got the played words only, in order.
    words = [f for f in rec.frames(TTSTextFrame)]
    heard = [f.text for f in words if f.pts is not None and f.pts <= marks["clock"]]
    said = _assistant_texts(context)
    assert len(said) == 2 and said[1] == "Sure. Go ahead."
    assert LONG.startswith(said[0]) and said[0] != LONG
    assert abs(len(said[0].split()) - len(heard)) <= 1, (said[0], heard)
    # The next turn played normally.
    assert sum(len(w.audio) for w in speaker.written[marks["n_after_window"] :]) > 0


async def test_a_reply_still_playing_when_the_next_starts_is_cut_at_a_barge_in(engine) -> None:
    """Prevents: reply 1 (e.g. before a tool call) fully generated and still playing when reply 2
    starts in the engine, then a barge-in: reply 1 must be cut where the listener was and the
    unplayed reply 2 removed, not reply 1 kept whole."""
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(seed=3))
    speaker = RealtimeSpeaker(SR)
    marks: dict[str, float] = {}

    async def driver(worker) -> None:
        await worker.queue_frames(llm_turn(*tokens_of(LONG)))
        await wait_for(lambda: tts._latest is not None and tts._latest.done.is_set())
        first = tts._latest
        await worker.queue_frames(llm_turn(*tokens_of("And here is the answer.")))
        await wait_for(lambda: tts._latest is not first and tts._latest.stream is not None)
        marks["generated"] = first.stream.frames * 0.08
        await worker.queue_frame(InterruptionFrame())
        conv = tts.conversation
        await wait_for(lambda: len(conv.turns) == 1 and conv.turns[0].frames * 0.08
                       < marks["generated"] - 0.08, limit_s=10.0)
        await worker.queue_frame(EndFrame())

    await run_pipeline([tts, speaker], driver, sample_rate=SR)
    (kept,) = tts.conversation.turns
    assert 0 < kept.frames * 0.08 < marks["generated"] and LONG.startswith(kept.text.strip())


async def test_words_after_an_llm_pause_are_timed_when_they_play(engine) -> None:
    """Prevents: words after an LLM pause inside a reply (a tool call; the reply stays one audio
    context) timed as if the playback had not sat dry, so they reached the transport and the
    assistant context seconds before they were spoken."""
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(seed=1))
    rec = Recorder()
    speaker = RealtimeSpeaker(SR)
    before, after = "One two three. Four five six.", " Seven eight nine."
    offset: dict[str, float] = {}

    async def driver(worker) -> None:
        offset["s"] = time.monotonic() - tts.get_clock().get_time() / 1e9
        await worker.queue_frames([LLMFullResponseStartFrame(),
                                   *(LLMTextFrame(t) for t in tokens_of(before))])
        await asyncio.sleep(3.0)  # the LLM calls a tool; the speaker plays everything and waits
        await worker.queue_frames([*(LLMTextFrame(t) for t in tokens_of(after)),
                                   LLMFullResponseEndFrame()])
        await wait_for(lambda: bool(rec.frames(TTSStoppedFrame)), limit_s=20.0)
        await wait_for(lambda: tts._latest is not None and tts._latest.done.is_set())
        await asyncio.sleep(0.5)
        await worker.queue_frame(EndFrame())

    await run_pipeline([tts, rec, speaker], driver, sample_rate=SR)
    audio = [w for w in speaker.written if w.kind == "TTSAudioRawFrame"]
    ends = [w.t + len(w.audio) / (2 * SR) for w in audio]
    gaps = [i for i in range(1, len(audio)) if audio[i].t - ends[i - 1] > 0.5]
    assert gaps, "the playback sat dry during the pause"
    resumed = audio[gaps[0]].t
    late = [f for f in rec.frames(TTSTextFrame) if f.text.strip(" .") in {"Seven", "eight", "nine"}]
    assert late, "words after the pause were spoken"
    for frame in late:  # never timed before its audio could play (0.3 s for word estimates)
        assert frame.pts / 1e9 + offset["s"] >= resumed - 0.3, (frame.text, resumed)


async def test_non_interruptible_speak_survives_a_barge_in(engine) -> None:
    """A `TTSSpeakFrame` marked non-interruptible (e.g. a legal notice) must be spoken and kept in
    full even when the user barges in while it is generated."""
    tts = MossTTSService(engine=engine)
    text = "This call may be recorded."
    notice = TTSSpeakFrame(text)
    notice.interruptible = False
    down, up = await run_test(
        tts, frames_to_send=[notice, SleepFrame(0.15), InterruptionFrame(), SleepFrame(0.1)]
    )
    assert sum(isinstance(f, TTSStoppedFrame) for f in down) == 1
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    (turn,) = tts.conversation.turns
    assert turn.text.strip() == text and turn.frames > 0 and not tts._latest.cancelled


def _assistant_texts(context: LLMContext) -> list[str]:
    out = []
    for m in context.get_messages():
        if m.get("role") == "assistant":
            content = m["content"]
            out.append(content if isinstance(content, str) else " ".join(c["text"] for c in content))
    return out
