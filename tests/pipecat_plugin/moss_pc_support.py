"""Test support for the Pipecat plugin: frame builders, recorders and a real-time speaker."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import uvicorn
from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner


def llm_turn(*tokens: str) -> list[Frame]:
    """One LLM response streamed token by token, as an LLM service emits it."""
    return [LLMFullResponseStartFrame(), *(LLMTextFrame(t) for t in tokens), LLMFullResponseEndFrame()]


def tokens_of(text: str) -> list[str]:
    """Split text into LLM-like deltas: each word with its leading space."""
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


def audio_frames(frames: Sequence[Frame]) -> list[TTSAudioRawFrame]:
    return [f for f in frames if isinstance(f, TTSAudioRawFrame)]


def pcm_seconds(frames: Sequence[OutputAudioRawFrame]) -> float:
    return sum(len(f.audio) / (2 * f.sample_rate * f.num_channels) for f in frames)


def rms(pcm: bytes) -> float:
    x = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


class Recorder(FrameProcessor):
    """Keeps every frame that passes (both directions), with its arrival time; forwards all."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.down: list[tuple[float, Frame]] = []
        self.up: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        (self.down if direction == FrameDirection.DOWNSTREAM else self.up).append(
            (time.monotonic(), frame)
        )
        await self.push_frame(frame, direction)

    def frames(self, kind: type | tuple[type, ...] = Frame) -> list[Frame]:
        return [f for _, f in self.down if isinstance(f, kind)]


@dataclass
class Written:
    t: float
    audio: bytes
    kind: str
    sample_rate: int


class RealtimeSpeaker(BaseOutputTransport):
    """An output transport that "plays" audio in real time and remembers what it played."""

    def __init__(self, sample_rate: int = 24000, **kwargs) -> None:
        super().__init__(
            TransportParams(
                audio_out_enabled=True,
                audio_out_sample_rate=sample_rate,
                audio_out_end_silence_secs=0,
            ),
            **kwargs,
        )
        self.written: list[Written] = []
        self.interrupted_at: list[int] = []  # len(written) when each interruption arrived

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, InterruptionFrame):
            self.interrupted_at.append(len(self.written))
        await super().process_frame(frame, direction)

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        self.written.append(
            Written(time.monotonic(), frame.audio, type(frame).__name__, frame.sample_rate)
        )
        # The speaker's pace: a chunk takes its own duration to play.
        await asyncio.sleep(len(frame.audio) / (2 * frame.sample_rate))
        return True


@dataclass
class PipelineRun:
    worker: PipelineWorker
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def run_pipeline(
    processors: Sequence[FrameProcessor],
    driver: Callable[[PipelineWorker], Awaitable[None]],
    *,
    sample_rate: int = 24000,
    limit_s: float = 60.0,
) -> None:
    """Run a real pipeline while `driver` queues frames into it (it must end with an EndFrame)."""
    worker = PipelineWorker(
        Pipeline(list(processors)),
        params=PipelineParams(
            audio_out_sample_rate=sample_rate, enable_metrics=True, enable_usage_metrics=True
        ),
        cancel_on_idle_timeout=False,
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker, _frame) -> None:
        started.set()

    async def drive() -> None:
        await asyncio.wait_for(started.wait(), timeout=10)
        await driver(worker)

    try:
        await asyncio.wait_for(asyncio.gather(runner.run(), drive()), timeout=limit_s)
    finally:
        await worker.cancel()


async def wait_for(predicate: Callable[[], bool], limit_s: float = 20.0) -> None:
    """Poll a condition on the event loop (not a sleep that hides a race: fails on timeout)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """Import an example script as a module (examples/ is not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def serve(app) -> tuple[uvicorn.Server, asyncio.Task, int]:
    """Run an ASGI app on 127.0.0.1 with a free port, inside this event loop."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started, limit_s=10)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, port
