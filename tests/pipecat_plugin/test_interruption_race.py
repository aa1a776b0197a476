"""Audio after a barge-in: which of it is ours (the fade) and which is Pipecat's (one chunk).

Pipecat 1.14's output transport keeps its audio task running through an interruption
(`BaseOutputTransport.MediaSender.handle_interruptions` drains the audio queue instead of
cancelling the task). A chunk the audio task took off the queue before the drain, which can
happen while `BaseOutputTransport.process_frame` is still awaiting `_start_interruption()` for
the `InterruptionFrame`, is written afterwards: one 40 ms chunk of the interrupted reply, queued
before the interruption, reaches the speaker after the `InterruptionFrame` did, and makes the
transport report the bot speaking again (`BotStartedSpeakingFrame` right after the
`BotStoppedSpeakingFrame` of the interruption). The service cannot reach that queue. These
tests pin that behaviour (they fail if Pipecat changes it) and pin ours: after the service
handles the interruption it pushes no audio of the interrupted reply, only the short fade, and
only after the `InterruptionFrame`.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import numpy as np
from moss_pc_support import llm_turn, run_pipeline, tokens_of, wait_for
from pipecat.audio.filters.base_audio_filter import BaseAudioFilter
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndFrame,
    FilterControlFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams

from moss_pipecat import MossTTSService

SR = 24000
CHUNK = int(0.04 * SR) * 2  # bytes of one transport chunk (audio_out_10ms_chunks=4)
FADE = int(0.008 * SR)  # samples of the default 8 ms fade
LONG = (
    "One two three. Four five six. Seven eight nine. Ten eleven twelve. Thirteen fourteen. "
    "Fifteen sixteen seventeen. Eighteen nineteen twenty."
)
# Paced like production (the service stays ~0.5 s ahead of the speaker, so the transport always
# has chunks of the reply queued), and room for twenty calls at once.
ENGINE_OVERRIDES = {
    "lead_s": 0.5,
    "max_streams": 20,
    "max_conversations": 40,
    "max_frames_per_turn": 60,
    "kv_num_blocks": 1024,
}


class ChunkGate(BaseAudioFilter):
    """An output filter (it runs in the transport's audio task between taking a chunk off the
    audio queue and writing it) that, once armed, holds the next chunk there until released."""

    def __init__(self) -> None:
        self._armed = False
        self.held: bytes | None = None
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    def arm(self) -> None:
        self._armed = True

    async def start(self, sample_rate: int) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def process_frame(self, frame: FilterControlFrame) -> None:
        pass

    async def filter(self, audio: bytes) -> bytes:
        if self._armed:
            self._armed = False
            self.held = audio
            self.holding.set()
            await self.release.wait()
        return audio


@dataclass
class Written:
    kind: str
    audio: bytes


class Speaker(BaseOutputTransport):
    """A real-time output transport that records what it writes and when the interruption
    arrives (`arrived_at`) and has been handled, its queue drained (`handled_at`)."""

    def __init__(self, audio_filter: BaseAudioFilter | None = None, **kwargs) -> None:
        super().__init__(
            TransportParams(
                audio_out_enabled=True,
                audio_out_sample_rate=SR,
                audio_out_end_silence_secs=0,
                audio_out_filter=audio_filter,
            ),
            **kwargs,
        )
        self.written: list[Written] = []
        self.arrived_at: list[int] = []
        self.handled_at: list[int] = []

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, InterruptionFrame):
            self.arrived_at.append(len(self.written))
            await super().process_frame(frame, direction)
            self.handled_at.append(len(self.written))
            return
        await super().process_frame(frame, direction)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        self.written.append(Written(type(frame).__name__, frame.audio))
        await asyncio.sleep(len(frame.audio) / (2 * frame.sample_rate))  # the speaker's pace
        return True

    def tts_seconds(self) -> float:
        return sum(len(w.audio) for w in self.written if w.kind == "TTSAudioRawFrame") / (2 * SR)


@dataclass
class Pushed:
    phase: str  # "before", "during" or "after" the service's InterruptionFrame handling
    frame: Frame


@dataclass
class TtsTrace:
    """Every frame the service pushes, in order, against its own interruption handling
    (Pipecat's push and process event handlers, which run inline)."""

    phase: str = "before"
    pushed: list[Pushed] = field(default_factory=list)
    speaking: list[Pushed] = field(default_factory=list)  # Bot*SpeakingFrames it received
    handled: asyncio.Event = field(default_factory=asyncio.Event)

    def attach(self, tts: MossTTSService) -> None:
        @tts.event_handler("on_before_process_frame")
        async def _start(_tts, frame: Frame) -> None:
            if isinstance(frame, InterruptionFrame):
                self.phase = "during"
            elif isinstance(frame, (BotStartedSpeakingFrame, BotStoppedSpeakingFrame)):
                self.speaking.append(Pushed(self.phase, frame))

        @tts.event_handler("on_after_process_frame")
        async def _end(_tts, frame: Frame) -> None:
            if isinstance(frame, InterruptionFrame):
                self.phase = "after"
                self.handled.set()

        @tts.event_handler("on_before_push_frame")
        async def _push(_tts, frame: Frame) -> None:
            self.pushed.append(Pushed(self.phase, frame))

    def audio_before(self) -> bytes:
        """The reply's audio the service pushed before it started handling the interruption."""
        return b"".join(p.frame.audio for p in self.pushed
                        if p.phase == "before" and isinstance(p.frame, TTSAudioRawFrame))

    def check_ours(self) -> list[Pushed]:
        """Our half of the contract; returns the fades pushed."""
        late = [p for p in self.pushed
                if p.phase != "before" and isinstance(p.frame, TTSAudioRawFrame)]
        assert not late, "audio of the interrupted reply pushed after its interruption"
        (interruption,) = [i for i, p in enumerate(self.pushed)
                           if isinstance(p.frame, InterruptionFrame)]
        fades = [(i, p) for i, p in enumerate(self.pushed)
                 if type(p.frame) is OutputAudioRawFrame]
        assert len(fades) <= 1
        for i, p in fades:  # the fade follows the InterruptionFrame, in the handler
            assert i > interruption and p.phase == "during"
        return [p for _, p in fades]


def _check_fade(written: Written) -> None:
    fade = np.frombuffer(written.audio, dtype=np.int16)
    assert written.kind == "OutputAudioRawFrame"
    assert len(fade) == CHUNK // 2, "padded to one chunk, so nothing waits in the transport"
    assert not fade[FADE:].any(), "an 8 ms ramp, silence after it"


async def test_a_chunk_the_transport_took_before_the_interruption_still_plays(engine) -> None:
    """Pins Pipecat: a chunk of the reply that the output transport's audio task took off its
    queue before the transport drained it for an `InterruptionFrame` is still written, after the
    transport handled the interruption, followed by our fade; the rest of the queued reply is
    dropped. Forced: an output filter holds that chunk inside the audio task while the
    interruption is handled. Pins ours: nothing of the reply is pushed after our handling."""
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(seed=5))
    trace = TtsTrace()
    trace.attach(tts)
    gate = ChunkGate()
    speaker = Speaker(gate)

    async def driver(worker) -> None:
        await worker.queue_frames(llm_turn(*tokens_of(LONG)))
        await wait_for(lambda: speaker.tts_seconds() >= 0.4)
        gate.arm()
        await asyncio.wait_for(gate.holding.wait(), timeout=5)  # taken off the queue, not written
        await worker.queue_frame(InterruptionFrame())
        await wait_for(lambda: bool(speaker.handled_at) and trace.handled.is_set())
        gate.release.set()
        await asyncio.sleep(0.3)  # observation window: the held chunk, the fade, nothing else
        await worker.queue_frame(EndFrame())

    await run_pipeline([tts, speaker], driver, sample_rate=SR)

    (arrived,) = speaker.arrived_at
    assert speaker.handled_at == [arrived], "the held chunk was not written before the drain"
    after = speaker.written[arrived:]
    assert [w.kind for w in after] == ["TTSAudioRawFrame", "OutputAudioRawFrame"], after
    held, fade = after
    # Pipecat's chunk: the one the audio task held, queued before the interruption.
    assert held.audio == gate.held and len(held.audio) == CHUNK
    before = trace.audio_before()
    start = before.find(held.audio)
    assert start >= 0, "the late chunk is audio the service pushed before the interruption"
    assert len(before) - (start + CHUNK) >= 4 * CHUNK, "more of the reply was queued, and dropped"
    # Ours: no audio after the handling, and the fade after the InterruptionFrame.
    (pushed_fade,) = trace.check_ours()
    assert pushed_fade.frame.audio == fade.audio
    _check_fade(fade)
    # Pipecat's side effect: the transport said the bot stopped at the interruption, and the
    # late chunk says it started again (it stops only at its 3 s fallback, or with more audio).
    after_kinds = [type(p.frame) for p in trace.speaking if p.phase == "after"]
    assert after_kinds == [BotStoppedSpeakingFrame, BotStartedSpeakingFrame], after_kinds


async def test_twenty_parallel_calls_interrupted_at_random_moments(engine) -> None:
    """The adversarial case: twenty calls on one engine, each barged in on at a random moment.
    In every call the service pushes no audio of the interrupted reply after handling the
    interruption, the fade follows the InterruptionFrame, and the speaker gets at most one
    chunk of the reply after the InterruptionFrame (Pipecat's, above), queued before it and
    written before the fade."""
    rng = random.Random(20)

    async def call(i: int) -> tuple[Speaker, TtsTrace]:
        tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(seed=i))
        trace = TtsTrace()
        trace.attach(tts)
        speaker = Speaker()
        delay = rng.uniform(0.0, 1.5)

        async def driver(worker) -> None:
            await worker.queue_frames(llm_turn(*tokens_of(LONG)))
            await wait_for(lambda: speaker.tts_seconds() > 0, limit_s=40)
            await asyncio.sleep(delay)  # paces the scenario: the barge-in moment
            await worker.queue_frame(InterruptionFrame())
            await wait_for(lambda: trace.handled.is_set() and bool(speaker.handled_at))
            await asyncio.sleep(0.4)  # observation window
            await worker.queue_frame(EndFrame())

        await run_pipeline([tts, speaker], driver, sample_rate=SR, limit_s=90)
        return speaker, trace

    results = await asyncio.gather(*(call(i) for i in range(20)))
    for i, (speaker, trace) in enumerate(results):
        fades = trace.check_ours()
        (arrived,) = speaker.arrived_at
        after = speaker.written[arrived:]
        tts_after = [w for w in after if w.kind == "TTSAudioRawFrame"]
        assert len(tts_after) <= 1, (i, [w.kind for w in after])
        if tts_after:
            assert after[0] is tts_after[0], "Pipecat's late chunk comes before the fade"
            assert trace.audio_before().find(tts_after[0].audio) >= 0, "queued before"
        rest = [w for w in after if w.kind != "TTSAudioRawFrame"]
        assert len(rest) == len(fades), (i, [w.kind for w in after])
        for w in rest:
            _check_fade(w)
