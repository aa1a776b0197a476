"""Shared pieces of the Pipecat examples: the voice pipeline, a scripted LLM, engine setup.

The scripted LLM streams canned replies token by token exactly like a real LLM service
(`LLMFullResponseStartFrame`, `LLMTextFrame` deltas, `LLMFullResponseEndFrame`), so the examples
and their tests run with no network and no API keys.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from pipecat.frames.frames import (
    Frame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMRunFrame,
    LLMTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from core import Engine, EngineConfig
from moss_pipecat import MossTTSService, MossUserTurnCapture

TINY_NOTICE = (
    "NOTICE: no --model/--codec given, so this runs on TINY RANDOM weights written to a temp "
    "dir. The pipeline, streaming and context handling are real; the audio is noise, not speech."
)


def llm_deltas(text: str) -> list[str]:
    """Split a reply into LLM-like deltas: words with their leading space, punctuation apart."""
    words = text.split(" ")
    out: list[str] = []
    for i, word in enumerate(words):
        prefix = "" if i == 0 else " "
        if len(word) > 1 and word[-1] in ".,!?;:":
            out += [prefix + word[:-1], word[-1]]
        else:
            out.append(prefix + word)
    return out


class ScriptedLLM(FrameProcessor):
    """Stands in for an LLM service: each trigger streams the next canned reply.

    Triggers are `LLMContextFrame`s (sent by the user aggregator when the user's turn ends) and
    `speak_next()` (e.g. a greeting when the client connects).

    Args:
        replies: Canned replies, used in order (the last one repeats).
        tokens_per_s: Streaming rate of the deltas (a typical LLM runs at 30-100).
    """

    def __init__(self, replies: Sequence[str], *, tokens_per_s: float = 40.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not replies:
            raise ValueError("ScriptedLLM needs at least one reply")
        self._replies = list(replies)
        self._reply_index = 0
        self._delay = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            await self.speak_next()
        else:
            await self.push_frame(frame, direction)

    async def speak_next(self) -> None:
        """Stream the next canned reply downstream, delta by delta."""
        text = self._replies[min(self._reply_index, len(self._replies) - 1)]
        self._reply_index += 1
        await self.push_frame(LLMFullResponseStartFrame())
        for delta in llm_deltas(text):
            await self.push_frame(LLMTextFrame(delta))
            if self._delay:
                await asyncio.sleep(self._delay)
        await self.push_frame(LLMFullResponseEndFrame())


def open_engine(
    model: str | None, codec: str | None, *, device: str = "auto", config: EngineConfig | None = None
) -> Engine:
    """The real checkpoint when given, else tiny random weights with a loud notice."""
    if (model is None) != (codec is None):
        raise SystemExit("give both --model and --codec, or neither (tiny weights)")
    if model is None:
        logger.warning(TINY_NOTICE)
        print(TINY_NOTICE, flush=True)
        from core.tiny import write_tiny

        model, codec = (str(p) for p in write_tiny(tempfile.mkdtemp(prefix="moss-tiny-")))
    return Engine.from_pretrained(model, codec, device=device, config=config)


def write_demo_voice(path: Path) -> Path:
    """A synthetic 3 s voiced reference (tiny-weights demo only: it exercises the voice path)."""
    import soundfile as sf

    t = np.arange(24000 * 3) / 24000
    pitch = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    wave = 0.25 * np.sin(2 * np.pi * np.cumsum(pitch) / 24000) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    sf.write(path, wave.astype(np.float32), 24000)
    return path


SYSTEM_PROMPT = (
    "You are a friendly voice assistant. Answer in one to three short spoken sentences, "
    "without markdown, lists or emoji."
)
SCRIPT = [
    "Hello! I am a voice bot running MOSS text to speech on this machine. How can I help?",
    "That is a good question. I am only a scripted demo, but my voice is streamed token by token.",
    "Interrupt me any time, and I will stop right where you cut in.",
    "Thanks for trying me out. Have a lovely day!",
]


def _key(name: str) -> str:
    if not os.environ.get(name):
        raise SystemExit(f"{name} is not set (or use the scripted mode: --llm scripted --stt none)")
    return os.environ[name]


def make_services(llm: str, stt: str) -> tuple[Any, Any]:
    """(stt or None, llm) for the chosen modes; real services are imported only when asked."""
    stt_service = None
    if stt == "openai":
        from pipecat.services.openai.stt import OpenAISTTService

        stt_service = OpenAISTTService(api_key=_key("OPENAI_API_KEY"))
    elif stt == "deepgram":
        from pipecat.services.deepgram.stt import DeepgramSTTService

        stt_service = DeepgramSTTService(api_key=_key("DEEPGRAM_API_KEY"))
    elif stt != "none":
        raise ValueError(f"unknown stt {stt!r}")
    if llm == "openai":
        from pipecat.services.openai.llm import OpenAILLMService

        return stt_service, OpenAILLMService(api_key=_key("OPENAI_API_KEY"))
    if llm != "scripted":
        raise ValueError(f"unknown llm {llm!r}")
    return stt_service, ScriptedLLM(SCRIPT)


def build_voice_worker(
    transport: Any,
    engine: Engine,
    *,
    voice: str | None = None,
    llm: str = "scripted",
    stt: str = "none",
    audio_in: bool = True,
    in_rate: int = 16000,
    out_rate: int = 24000,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
) -> tuple[PipelineWorker, MossTTSService]:
    """One call: transport in -> (STT) -> user-turn capture -> LLM -> MOSS TTS -> transport out.

    The recommended Pipecat layout: the capture sits right after speech-to-text so every user
    turn (words, and speech when an STT runs) conditions the next reply; the assistant
    aggregator sits after the output transport so the LLM context gets only the words played.
    The bot speaks first when the client connects; the call ends when it disconnects.
    """
    stt_service, llm_service = make_services(llm, stt)
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(voice=voice))
    context = LLMContext(messages=[{"role": "system", "content": SYSTEM_PROMPT}])
    user_params = None
    if audio_in:
        from pipecat.audio.vad.silero import SileroVADAnalyzer

        user_params = LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
    user_agg, assistant_agg = LLMContextAggregatorPair(context, user_params=user_params)
    stages: list[Any] = [transport.input()]
    if stt_service is not None:
        stages.append(stt_service)
    stages += [
        MossUserTurnCapture(tts, capture_audio=stt_service is not None),
        user_agg,
        llm_service,
        tts,
        transport.output(),
        assistant_agg,
    ]
    worker = PipelineWorker(
        Pipeline(stages),
        params=PipelineParams(
            audio_in_sample_rate=in_rate,
            audio_out_sample_rate=out_rate,
            enable_metrics=True,
            enable_usage_metrics=True,
        ),
    )

    @transport.event_handler("on_client_connected")
    async def on_connected(_transport: Any, _client: Any) -> None:
        await worker.queue_frames([LLMRunFrame()])  # the bot speaks first

    @transport.event_handler("on_client_disconnected")
    async def on_disconnected(_transport: Any, _client: Any) -> None:
        if on_disconnect is not None:
            await on_disconnect()
        await worker.cancel()

    return worker, tts


def bot_arg_parser(description: str, *, port: int) -> argparse.ArgumentParser:
    """The command line both voice bots share (engine, voice, services, where to listen)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (0.0.0.0: all; put TLS in front of it)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--model", help="model directory or hub id (default: tiny weights)")
    parser.add_argument("--codec", help="codec directory or hub id (with --model)")
    parser.add_argument("--voice", help="reference recording for the voice prompt")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:N")
    parser.add_argument("--llm", choices=["scripted", "openai"], default="scripted")
    parser.add_argument("--stt", choices=["none", "openai", "deepgram"], default="none")
    return parser


def serve_bot(create_app: Callable[..., Any], args: argparse.Namespace) -> None:
    """Load the engine once, serve the bot's app until stopped, then close the engine."""
    import uvicorn

    engine = open_engine(args.model, args.codec, device=args.device)
    try:
        app = create_app(engine, voice=args.voice, llm=args.llm, stt=args.stt)
        uvicorn.run(app, host=args.host, port=args.port)
    finally:
        engine.close()
