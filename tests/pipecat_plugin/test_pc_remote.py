"""`MossTTSService` over the network: the same call as in process, with the engine behind
`create_app` on a loopback port and the service speaking through `core.remote.RemoteEngine`."""

from __future__ import annotations

import numpy as np
import pytest
from moss_pc_support import RealtimeSpeaker, Recorder, llm_turn, run_pipeline, tokens_of, wait_for
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)

from core.remote import RemoteConversation, RemoteEngine
from core.server.run import serving
from moss_pipecat import MossTTSService, MossUserTurnCapture

TOKEN = "pc-remote-token-0123456789abcdef"
FRAME_S = 0.08
SR = 24000
USER_SR = 16000
LONG = "One two three. Four five six. Seven eight nine. Ten eleven twelve. Thirteen fourteen."
# Paced like production, so the barge-in lands while the reply is still generating.
ENGINE_OVERRIDES = {"lead_s": 0.5}
pytestmark = pytest.mark.timeout(180)


def _speech(seconds: float, chunk_s: float = 0.02) -> list[InputAudioRawFrame]:
    t = np.arange(int(seconds * USER_SR)) / USER_SR
    wave = (0.3 * np.sin(2 * np.pi * 150 * t) * 32767).astype(np.int16)
    step = int(chunk_s * USER_SR)
    return [InputAudioRawFrame(wave[i : i + step].tobytes(), USER_SR, 1)
            for i in range(0, len(wave), step)]


def _transcript(text: str) -> TranscriptionFrame:
    return TranscriptionFrame(text, "user", "2026-01-01T00:00:00Z")


async def test_a_call_over_the_remote_engine(engine) -> None:
    """Prevents the plugin working only in process: over the wire a call keeps its user turns
    (words and speech) before the replies, every reply plays and ends with TTSStoppedFrame, and a
    barge-in mid-reply cuts the server's turn to what was heard before the next reply."""
    async with serving(engine, token=TOKEN) as url:
        remote = RemoteEngine(url, token=TOKEN)
        tts = MossTTSService(engine=remote, settings=MossTTSService.Settings(seed=1),
                             session_id="call-42")
        capture = MossUserTurnCapture(tts, capture_audio=True)
        rec = Recorder()
        speaker = RealtimeSpeaker(SR)
        marks: dict = {}

        def stopped() -> list[str]:
            return [f.context_id for f in rec.frames(TTSStoppedFrame)]

        async def driver(worker) -> None:
            await worker.queue_frames([
                UserStartedSpeakingFrame(), *_speech(0.5), UserStoppedSpeakingFrame(),
                _transcript("Hello there."), *llm_turn(*tokens_of("Hi! Nice to meet you.")),
            ])
            await wait_for(lambda: len(stopped()) == 1, limit_s=30)
            first = tts._latest
            marks["first"] = first.context_id
            await worker.queue_frames([_transcript("Tell me a story."),
                                       *llm_turn(*tokens_of(LONG))])
            await wait_for(lambda: tts._latest is not first, limit_s=10)
            cut = tts._latest
            # a few words of the story were heard (the playback clock of this reply)
            await wait_for(lambda: tts._playout.played_s(cut.context_id) >= 0.6, limit_s=30)
            marks["cut"] = cut.context_id
            await worker.queue_frame(InterruptionFrame())
            await wait_for(lambda: cut.done.is_set() and cut.cancelled, limit_s=10)
            await wait_for(lambda: cut.stream.done, limit_s=10)
            marks["played"] = cut.played_s
            await worker.queue_frames([_transcript("Never mind."),
                                       *llm_turn(*tokens_of("Sure. Go ahead."))])
            await wait_for(lambda: tts._latest is not cut and tts._latest.done.is_set(),
                           limit_s=30)
            marks["last"] = tts._latest.context_id
            marks["generated"] = cut.stream.frames  # the server's count, with its turn_end
            conv = tts.conversation  # the server's snapshots arrive after each change
            await wait_for(lambda: len(conv.turns) == 6 and conv.turns[-1].frames > 0, 10)
            await worker.queue_frame(EndFrame())

        try:
            await run_pipeline([capture, tts, rec, speaker], driver, sample_rate=SR, limit_s=120)
        finally:
            await remote.aclose()

    assert not rec.frames(ErrorFrame), [f.error for f in rec.frames(ErrorFrame)]
    by_ctx: dict[str, int] = {}
    for f in rec.frames(TTSAudioRawFrame):
        by_ctx[f.context_id] = by_ctx.get(f.context_id, 0) + len(f.audio)
    assert all(by_ctx.get(marks[k], 0) > 0 for k in ("first", "cut", "last")), by_ctx
    # replies that ended end with TTSStoppedFrame; the interrupted one was cut instead
    assert stopped() == [marks["first"], marks["last"]]

    assert isinstance(tts.conversation, RemoteConversation)
    assert tts.conversation.session_id == "call-42"  # the call id routes every reconnect
    turns = tts.conversation.turns
    assert [t.role for t in turns] == ["user", "assistant"] * 3
    assert [t.text for t in turns[0::2]] == ["Hello there.", "Tell me a story.", "Never mind."]
    assert turns[0].frames >= 5, "the user's speech went over the wire and was encoded"
    assert turns[1].text == "Hi! Nice to meet you." and turns[1].frames > 0
    kept = turns[3]
    assert 0 < kept.frames < marks["generated"], (kept.frames, marks)
    assert kept.frames * FRAME_S <= marks["played"] + FRAME_S, (kept.frames, marks)
    assert marks["played"] >= 0.6
    assert kept.text.strip() and LONG.startswith(kept.text.strip()) and kept.text.strip() != LONG
    assert turns[5].text == "Sure. Go ahead." and turns[5].frames > 0
