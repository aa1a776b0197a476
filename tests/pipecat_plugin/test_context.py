"""A call's context across turns, and many calls on one engine."""

from __future__ import annotations

import asyncio

import numpy as np
from moss_pc_support import Recorder, audio_frames, llm_turn, run_pipeline, tokens_of, wait_for
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    InputAudioRawFrame,
    TranscriptionFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.tests.utils import run_test

from moss_pipecat import MossTTSService, MossUserTurnCapture

USER_SR = 16000


def _speech(seconds: float, chunk_s: float = 0.02) -> list[InputAudioRawFrame]:
    """Voiced-looking user audio, in transport-sized chunks."""
    t = np.arange(int(seconds * USER_SR)) / USER_SR
    wave = (0.3 * np.sin(2 * np.pi * 150 * t) * 32767).astype(np.int16)
    step = int(chunk_s * USER_SR)
    return [
        InputAudioRawFrame(wave[i : i + step].tobytes(), USER_SR, 1)
        for i in range(0, len(wave), step)
    ]


def _transcript(text: str) -> TranscriptionFrame:
    return TranscriptionFrame(text, "user", "2026-01-01T00:00:00Z")


async def test_second_turn_is_conditioned_on_first_and_on_user_turn(engine) -> None:
    """The second reply must be generated after the first reply and the captured user turn (text
    and speech) in the same conversation; otherwise the model loses the dialogue's prosody."""
    tts = MossTTSService(engine=engine)
    capture = MossUserTurnCapture(tts, capture_audio=True)
    rec = Recorder()

    def stopped() -> int:
        return len(rec.frames(TTSStoppedFrame))

    async def driver(worker) -> None:
        await worker.queue_frames(
            [
                *_speech(0.1),  # before speech: only the pre-roll is kept
                UserStartedSpeakingFrame(),
                *_speech(0.5),
                UserStoppedSpeakingFrame(),
                _transcript("What is the weather like?"),
                *llm_turn(*tokens_of("It is sunny and warm.")),
            ]
        )
        await wait_for(lambda: stopped() == 1)
        await worker.queue_frames(
            [_transcript("And tomorrow?"), *llm_turn(*tokens_of("Rain, I am afraid."))]
        )
        await wait_for(lambda: stopped() == 2)
        await worker.queue_frame(EndFrame())

    await run_pipeline([capture, tts, rec], driver)
    turns = tts.conversation.turns
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0].text == "What is the weather like?" and turns[2].text == "And tomorrow?"
    assert turns[1].text == "It is sunny and warm." and turns[3].text == "Rain, I am afraid."
    assert turns[0].frames >= 5, "0.5 s of speech + pre-roll encoded as the user's audio"
    assert turns[2].frames == 0
    assert turns[1].frames > 0 and turns[3].frames > 0


async def test_text_only_context_without_capture(engine) -> None:
    """Without the capture processor the conversation still keeps every reply (text-only)."""
    tts = MossTTSService(engine=engine)
    await run_test(tts, frames_to_send=[*llm_turn("One", " two."), *llm_turn("Three.")])
    assert [t.role for t in tts.conversation.turns] == ["assistant", "assistant"]


async def test_eight_pipelines_share_one_engine(engine) -> None:
    """Eight concurrent calls on one engine must all complete with their own audio; a shared
    engine must not mix up or starve conversations."""

    async def call(i: int):
        tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(seed=i))
        down, up = await run_test(
            tts, frames_to_send=llm_turn(*tokens_of(f"Caller {i}, your order is ready."))
        )
        return tts, down, up

    before = engine.stats().conversations
    results = await asyncio.gather(*(call(i) for i in range(8)))
    contexts = set()
    for tts, down, up in results:
        audio = audio_frames(down)
        assert audio, "every call gets audio"
        assert not [f for f in up if isinstance(f, ErrorFrame)]
        assert len({f.context_id for f in audio}) == 1
        contexts |= {f.context_id for f in audio}
        assert [t.role for t in tts.conversation.turns] == ["assistant"]
    assert len(contexts) == 8
    # Every call gave its conversation and its stream back to the shared engine.
    await wait_for(lambda: engine.stats().conversations == before)
    assert engine.stats().active_streams == 0
