"""`moss-tts` command line: stream a text through the engine into a WAV file.

    moss-tts say "Hello there. How are you?" -o out.wav [--voice ref.wav]
             [--model DIR_OR_ID --codec DIR_OR_ID | --tiny] [--device cuda]

The text is pushed word by word, as an LLM would stream it, so the run exercises the same path as
the plugins (incremental tokenization, text lead, chunked audio). `--tiny` uses random tiny
weights written to a temporary directory: the audio is noise, useful only to check the plumbing.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "OpenMOSS-Team/MOSS-TTS-Realtime"
DEFAULT_CODEC = "OpenMOSS-Team/MOSS-Audio-Tokenizer"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moss-tts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    say = sub.add_parser("say", help="synthesize text into a WAV file")
    say.add_argument("text", help="text to speak ('-' reads stdin)")
    say.add_argument("-o", "--output", type=Path, required=True, help="output .wav path")
    say.add_argument("--voice", help="reference audio of the voice to clone")
    say.add_argument("--model", default=DEFAULT_MODEL, help="model directory or hub id")
    say.add_argument("--codec", default=DEFAULT_CODEC, help="codec directory or hub id")
    say.add_argument("--tiny", action="store_true", help="random tiny weights (plumbing check)")
    say.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    say.add_argument("--seed", type=int, default=None)
    say.add_argument("--temperature", type=float, default=0.8)
    say.add_argument("--max-frames", type=int, default=1500, help="frame cap per turn (80 ms)")
    return parser


def _deltas(text: str) -> list[str]:
    """Split like an LLM stream: words with their following whitespace."""
    return re.findall(r"\S+\s*|\s+", text)


async def _say(args: argparse.Namespace, model: str, codec: str) -> int:
    import torch

    from core import Engine, EngineConfig, SamplingParams

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = EngineConfig(max_streams=1, max_conversations=1, lead_s=None,
                          max_frames_per_turn=args.max_frames,
                          max_text_chars=max(20_000, len(args.text) + 1))
    started = time.monotonic()
    engine = Engine.from_pretrained(model, codec, device=device, config=config)
    try:
        loaded = time.monotonic()
        voice = await engine.load_voice(args.voice) if args.voice else None
        sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
        conv = engine.conversation(voice=voice, sampling=sampling)
        pcm: list[bytes] = []
        t0 = time.monotonic()
        first: float | None = None
        async with conv.speak() as stream:
            for delta in _deltas(args.text):
                stream.push_text(delta)
            stream.end_text()
            async for chunk in stream:
                first = first or time.monotonic() - t0
                pcm.append(chunk.pcm)
        elapsed = time.monotonic() - t0
    finally:
        engine.close()
    audio = np.frombuffer(b"".join(pcm), dtype="<i2")
    import soundfile

    args.output.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(args.output), audio, 24000, subtype="PCM_16")
    seconds = audio.size / 24000
    print(f"wrote {args.output}: {seconds:.2f} s of audio; load {loaded - started:.1f} s, "
          f"first audio {1000 * (first or 0):.0f} ms, generation {elapsed:.2f} s "
          f"(RTF {elapsed / max(seconds, 1e-9):.2f}) on {device}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.text == "-":
        args.text = sys.stdin.read()
    if not args.text.strip():
        print("moss-tts: nothing to say (empty text)", file=sys.stderr)
        return 2
    if args.tiny:
        from core.tiny import write_tiny

        print("moss-tts: --tiny uses RANDOM weights: the output is noise", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="moss-tiny-") as tmp:
            model_dir, codec_dir = write_tiny(tmp)
            return asyncio.run(_say(args, str(model_dir), str(codec_dir)))
    return asyncio.run(_say(args, args.model, args.codec))


if __name__ == "__main__":
    sys.exit(main())
