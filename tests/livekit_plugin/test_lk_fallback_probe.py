"""`moss_livekit.TTS` as the primary of a real `tts.FallbackAdapter` inside a real AgentSession:
while the engine is full the replies are spoken by a second TTS, and the adapter's background
recovery probe (a MOSS synthesis whose audio is discarded) must not stay in the MOSS context."""

from __future__ import annotations

import asyncio

import numpy as np
from livekit.agents import tts as lk_tts
from livekit.agents import utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions
from lk_kit import assistant_messages, make_session, new_agent, wait_until

from moss_livekit import TTS

TONE_RATE = 24000
TONE_S_PER_CHAR = 0.04  # the backup voice speaks 25 characters a second


class ToneTTS(lk_tts.TTS):
    """A second, independent TTS (LiveKit's TTS interface, non-streaming): a 440 Hz tone whose
    length follows the text. It stands in for a hosted backup voice."""

    def __init__(self) -> None:
        super().__init__(
            capabilities=lk_tts.TTSCapabilities(streaming=False),
            sample_rate=TONE_RATE,
            num_channels=1,
        )
        self.texts: list[str] = []

    @property
    def model(self) -> str:
        return "tone"

    @property
    def provider(self) -> str:
        return "test"

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> lk_tts.ChunkedStream:
        self.texts.append(text)
        return _ToneStream(tts=self, input_text=text, conn_options=conn_options)


class _ToneStream(lk_tts.ChunkedStream):
    async def _run(self, output_emitter: lk_tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=utils.shortuuid(), sample_rate=TONE_RATE, num_channels=1,
            mime_type="audio/pcm",
        )
        n = int(len(self.input_text) * TONE_S_PER_CHAR * TONE_RATE)
        t = np.arange(n) / TONE_RATE
        output_emitter.push((np.sin(2 * np.pi * 440 * t) * 6000).astype(np.int16).tobytes())


def _fill_engine(engine) -> list:  # noqa: ANN001
    """Open a speaking turn on `max_streams` other conversations: the engine is full, so a new
    turn is refused at once (AdmissionError -> a retryable 503 for LiveKit)."""
    convs = [engine.conversation() for _ in range(engine.config.max_streams)]
    for conv in convs:
        conv.speak()  # admitted; it waits for text that never comes
    return convs


async def _free_engine(engine, convs: list) -> None:  # noqa: ANN001
    for conv in convs:
        conv.close()
    await wait_until(lambda: engine.stats().active_streams + engine.stats().queued_turns == 0)


async def test_a_fallback_recovery_probe_leaves_no_turn_in_the_conversation(engine) -> None:
    """Prevents: the FallbackAdapter's recovery probe (MOSS synthesizes the reply that the backup
    TTS is playing, and the adapter throws that audio away) being kept in the MOSS conversation
    as if the user had heard it, because the backup's playback report was credited to it."""
    moss = TTS(engine=engine)
    backup = ToneTTS()
    adapter = lk_tts.FallbackAdapter([moss, backup], max_retry_per_tts=0)
    recovered = asyncio.Event()
    adapter.on("tts_availability_changed",
               lambda ev: recovered.set() if ev.tts is moss and ev.available else None)
    second = "Here is the second answer, spoken by the backup voice."
    session, _, audio, _ = make_session(
        adapter, ["The first answer from the backup voice.", second, "MOSS is back now."],
        speed=1.0,
    )
    hogs = _fill_engine(engine)
    await session.start(new_agent())
    try:
        await session.run(user_input="First question")  # MOSS full: the backup speaks
        assert backup.texts and not recovered.is_set()
        await _free_engine(engine, hogs)
        hogs = []

        await session.run(user_input="Second question")  # the backup speaks; MOSS is probed
        await asyncio.wait_for(recovered.wait(), 20.0)  # the probe synthesized the reply
        conv = moss.conversation(session)
        await wait_until(lambda: engine.stats().active_streams == 0)
        assert len(audio.segments) == 2 and second in backup.texts  # the backup spoke both

        # the probe was never played: it must be gone from the context (cut to nothing)
        def unheard() -> list[tuple[str, int]]:
            return [(t.text, t.frames) for t in conv.turns if t.role == "assistant" and t.frames]

        try:
            await wait_until(lambda: not unheard(), limit_s=5.0)
        except AssertionError:
            pass
        assert not unheard(), f"a probe nobody heard is in the context: {unheard()}"
        assert [t.text for t in conv.turns if t.role == "user"] == [
            "First question", "Second question"]

        await session.run(user_input="Third question")  # MOSS serves again
        said = [m.text_content for m in assistant_messages(session)]
        assert said[-1] == "MOSS is back now." and not assistant_messages(session)[-1].interrupted
        assistant = [t for t in conv.turns if t.role == "assistant" and t.frames > 0]
        assert [t.text.strip() for t in assistant] == ["MOSS is back now."]
        assert len(audio.segments) == 3 and not any(i for _, i in audio.finished)
    finally:
        await _free_engine(engine, hogs)
        await session.aclose()
        await audio.aclose()
        await adapter.aclose()
        await moss.aclose()
