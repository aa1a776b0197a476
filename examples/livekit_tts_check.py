"""Synthesize with `moss_livekit.TTS` outside any room: proves the plugin speaks on this machine.

    python examples/livekit_tts_check.py -o OUT_DIR [--tiny | --model M --codec C]
        [--voice ref.wav] [--device auto] [--text "..."]

`livekit_agent.py console --text` never reaches the TTS (an AgentSession synthesizes only when it
has an audio output), so it cannot tell whether speech works. This script drives the plugin the
two ways LiveKit does, with no LiveKit server and no network (given local or cached weights):

* `tts.synthesize(text)`, LiveKit's `ChunkedStream` -> OUT_DIR/synthesize.wav
* `tts.stream()` fed word deltas at an LLM's pace, then `end_input()` -> OUT_DIR/stream.wav

and prints each clip's length, its time to first audio and how fast it was made. Both turns go
through one conversation, as two replies of one agent session would. Without --model/--codec it
loads the official OpenMOSS checkpoints (hub ids, cached by `livekit_agent.py download-files`);
`--tiny` writes tiny random weights instead (a wiring check: the audio is noise, not speech).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
import wave
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path

from livekit.agents import APIConnectOptions, APIError, tts, utils

import moss_livekit
from core import Engine, EngineConfig
from core.errors import MossError

TEXT = "Hello! This is MOSS text to speech, speaking through the LiveKit plugin."
SAMPLE_RATE = 24000
# No retries: a failure must show as itself, not as a silent second attempt.
CONN = APIConnectOptions(max_retry=0, timeout=60.0)


@dataclass(frozen=True, slots=True)
class Clip:
    """The audio of one synthesis and how long it took."""

    pcm: bytes  # s16le, 24 kHz mono
    ttfa_s: float  # request -> first audio frame
    wall_s: float  # request -> last audio frame

    @property
    def seconds(self) -> float:
        return len(self.pcm) / (2 * SAMPLE_RATE)


async def _collect(events: AsyncIterable[tts.SynthesizedAudio], start: float) -> Clip:
    """Gather the frames of one stream, checking they are 24 kHz mono as LiveKit expects."""
    chunks: list[bytes] = []
    first: float | None = None
    async for ev in events:
        frame = ev.frame
        assert (frame.sample_rate, frame.num_channels) == (SAMPLE_RATE, 1), (
            f"expected 24 kHz mono, got {frame.sample_rate} Hz x {frame.num_channels}"
        )
        if frame.samples_per_channel and first is None:
            first = time.perf_counter() - start
        chunks.append(bytes(frame.data))
    wall = time.perf_counter() - start
    return Clip(b"".join(chunks), ttfa_s=wall if first is None else first, wall_s=wall)


async def synthesize_clip(plugin: moss_livekit.TTS, text: str) -> Clip:
    """`synthesize()`: the whole text at once (LiveKit's non-streaming path)."""
    start = time.perf_counter()
    async with plugin.synthesize(text, conn_options=CONN) as chunked:
        return await _collect(chunked, start)


async def stream_clip(plugin: moss_livekit.TTS, text: str, *, tokens_per_s: float = 40.0) -> Clip:
    """`stream()`: word deltas pushed while audio is read, like an LLM reply in a session."""
    stream = plugin.stream(conn_options=CONN)

    async def feed() -> None:
        for delta in re.findall(r"\s*\S+", text):
            stream.push_text(delta)
            await asyncio.sleep(1.0 / tokens_per_s)
        stream.end_input()

    start = time.perf_counter()
    feeder = asyncio.create_task(feed())
    try:
        clip = await _collect(stream, start)
        await feeder
        return clip
    finally:
        await utils.aio.cancel_and_wait(feeder)
        await stream.aclose()


def write_wav(path: Path, pcm: bytes) -> Path:
    """16-bit mono WAV at the plugin's 24 kHz."""
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(pcm)
    return path


def report(name: str, path: Path, clip: Clip) -> str:
    speed = clip.seconds / clip.wall_s if clip.wall_s > 0 else 0.0
    return (
        f"{name:<10} {clip.seconds:6.2f} s of audio, first audio after {clip.ttfa_s * 1000:7.0f} "
        f"ms, made in {clip.wall_s:6.2f} s ({speed:.2f}x real time) -> {path}"
    )


async def run_check(engine: Engine, out_dir: Path, text: str, voice: str | None) -> list[Path]:
    """Both synthesis paths on one plugin instance; returns the two WAV paths."""
    plugin = moss_livekit.TTS(engine=engine, voice=voice)
    try:
        paths = []
        for name, make in (("synthesize", synthesize_clip), ("stream", stream_clip)):
            clip = await make(plugin, text)
            if not clip.pcm:
                raise RuntimeError(f"{name}: the plugin returned no audio")
            path = write_wav(out_dir / f"{name}.wav", clip.pcm)
            print(report(name, path, clip), flush=True)
            paths.append(path)
        return paths
    finally:
        await plugin.aclose()


def load_engine(args: argparse.Namespace, scratch: Path) -> Engine:
    """Tiny random weights (written to `scratch`) with --tiny, else the given checkpoint."""
    # Two turns, one at a time: a small pool; unpaced, so the speed printed is the engine's own.
    limits = dict(max_streams=2, max_conversations=2, lead_s=None)
    model, codec = args.model, args.codec
    if args.tiny:
        from core.tiny import write_tiny

        print("--tiny: tiny RANDOM weights, the audio is noise (a wiring check)", flush=True)
        model, codec = write_tiny(scratch)
        limits["max_frames_per_turn"] = 50  # random weights rarely stop: about 4 s per turn
    return Engine.from_pretrained(model, codec, device=args.device, config=EngineConfig(**limits))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out-dir", type=Path, required=True, help="where the WAVs go")
    parser.add_argument("--tiny", action="store_true", help="tiny random weights (no download)")
    parser.add_argument("--model", default=moss_livekit.DEFAULT_MODEL,
                        help="model directory or hub id (default: %(default)s)")
    parser.add_argument("--codec", default=moss_livekit.DEFAULT_CODEC,
                        help="codec directory or hub id (default: %(default)s)")
    parser.add_argument("--voice", help="reference recording to clone (default: model's voice)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:N")
    parser.add_argument("--text", default=TEXT, help="what to say")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moss-tiny-") as scratch:
        try:
            engine = load_engine(args, Path(scratch))
        except (MossError, ValueError) as exc:  # no weights offline, bad directory, bad --device
            print(f"cannot load the engine: {exc}", file=sys.stderr)
            return 1
        try:
            asyncio.run(run_check(engine, args.out_dir, args.text, args.voice))
        except (APIError, MossError, ValueError, RuntimeError) as exc:  # one line, no traceback
            print(f"synthesis failed: {exc}", file=sys.stderr)
            return 1
        finally:
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
