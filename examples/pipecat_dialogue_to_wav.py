"""A scripted three-turn dialogue through a real Pipecat pipeline into WAV files (`make demo`).

    python examples/pipecat_dialogue_to_wav.py --out demo_out \
        [--model DIR_OR_ID --codec DIR_OR_ID] [--voice ref.wav] [--device cuda]

Each user line enters the pipeline as a transcription (captured into the conversation by
`MossUserTurnCapture`), a scripted LLM streams the reply token by token into `MossTTSService`,
and every reply is written to `OUT/turn_N.wav`; `OUT/dialogue.wav` holds all replies and
`OUT/transcript.txt` the conversation as the engine kept it. Without --model/--codec it runs on
tiny random weights (noise, not speech) and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    LLMContextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pipecat_common import ScriptedLLM, open_engine, write_demo_voice  # noqa: E402

from core import EngineConfig  # noqa: E402
from moss_pipecat import MossTTSService, MossUserTurnCapture  # noqa: E402

DIALOGUE = [
    ("Hi! Could you help me plan a short trip to the coast this weekend?",
     "Of course! A weekend by the sea sounds lovely. Do you prefer quiet beaches or busy towns?"),
    ("Quiet, please. And I'd like to go hiking too.",
     "Then try the cliff path north of the bay. It's peaceful, and the views are wonderful."),
    ("That sounds perfect. Thank you!",
     "You're welcome. Pack a warm jacket, the wind up there can be strong. Have a great trip!"),
]
SAMPLE_RATE = 24000


class WavTurns(FrameProcessor):
    """Collects each reply's audio (by context id) and signals the end of every reply."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.turns: list[bytes] = []
        self._current: dict[str, bytearray] = {}
        self.turn_done = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and frame.context_id:
            self._current.setdefault(frame.context_id, bytearray()).extend(frame.audio)
        elif isinstance(frame, TTSStoppedFrame) and frame.context_id:
            self.turns.append(bytes(self._current.pop(frame.context_id, b"")))
            self.turn_done.set()
        await self.push_frame(frame, direction)


def write_wav(path: Path, pcm: bytes, rate: int = SAMPLE_RATE) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm)


async def run_dialogue(tts: MossTTSService, *, tokens_per_s: float = 40.0) -> list[bytes]:
    """Play DIALOGUE through `capture -> scripted LLM -> tts -> sink`; returns each reply's PCM."""
    capture = MossUserTurnCapture(tts)
    llm = ScriptedLLM([reply for _, reply in DIALOGUE], tokens_per_s=tokens_per_s)
    sink = WavTurns()
    worker = PipelineWorker(
        Pipeline([capture, llm, tts, sink]),
        params=PipelineParams(audio_out_sample_rate=SAMPLE_RATE, enable_metrics=True),
        cancel_on_idle_timeout=False,
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)

    async def drive() -> None:
        for i, (user, _) in enumerate(DIALOGUE, start=1):
            print(f"user: {user}", flush=True)
            sink.turn_done.clear()
            started = time.monotonic()
            await worker.queue_frames(
                [TranscriptionFrame(user, "user", ""), LLMContextFrame(LLMContext())]
            )
            await sink.turn_done.wait()
            seconds = len(sink.turns[-1]) / (2 * SAMPLE_RATE)
            took = time.monotonic() - started
            print(f"bot:  [turn {i}: {seconds:.2f} s of audio in {took:.2f} s]", flush=True)
        await worker.queue_frame(EndFrame())

    try:
        await asyncio.gather(runner.run(), drive())
    finally:
        await worker.cancel()

    return sink.turns


def write_outputs(out: Path, turns: list[bytes], tts: MossTTSService) -> list[Path]:
    """turn_N.wav per reply, dialogue.wav with all replies, transcript.txt as the engine kept it."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pcm in enumerate(turns, start=1):
        paths.append(out / f"turn_{i}.wav")
        write_wav(paths[-1], pcm)
    gap = np.zeros(int(0.4 * SAMPLE_RATE), dtype=np.int16).tobytes()
    write_wav(out / "dialogue.wav", gap.join(turns))
    lines = [f"{t.role}: {t.text}  [{t.frames} frames]" for t in tts.conversation.turns]
    (out / "transcript.txt").write_text("\n".join(lines) + "\n")
    return [*paths, out / "dialogue.wav", out / "transcript.txt"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--model", help="model directory or hub id (default: tiny weights)")
    parser.add_argument("--codec", help="codec directory or hub id (with --model)")
    parser.add_argument("--voice", type=Path, help="reference recording for the voice prompt")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    tiny = args.model is None
    # Offline rendering: no real-time lead cap; tiny weights never stop on their own, so cap turns.
    config = EngineConfig(lead_s=None, max_frames_per_turn=60 if tiny else 1500)
    engine = open_engine(args.model, args.codec, device=args.device, config=config)
    voice = args.voice
    if voice is None and tiny:
        args.out.mkdir(parents=True, exist_ok=True)
        voice = write_demo_voice(args.out / "demo_voice.wav")
    try:
        settings = MossTTSService.Settings(voice=str(voice) if voice else None, seed=args.seed)
        tts = MossTTSService(engine=engine, settings=settings)
        turns = asyncio.run(run_dialogue(tts))
        paths = write_outputs(args.out, turns, tts)
    finally:
        engine.close()
    print("wrote:", *[str(p) for p in paths], sep="\n  ")
    if tiny:
        print("(tiny random weights: the WAVs are noise; pass --model/--codec for speech)")


if __name__ == "__main__":
    main()
