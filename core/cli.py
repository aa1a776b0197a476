"""`moss-tts` command line: stream a text through the engine into a WAV file, or serve it.

    moss-tts say "Hello there. How are you?" -o out.wav [--voice ref.wav]
             [--model DIR_OR_ID --codec DIR_OR_ID | --tiny] [--device auto] [--debug]
    MOSS_SERVER_TOKEN=... moss-tts serve [--host 127.0.0.1] [--port 8765] [--tiny]
    MOSS_SERVER_TOKEN=... moss-tts token --client NAME [--ttl SECONDS]
                                         [--ray --replicas N | --min-replicas N --max-replicas M]

The text is pushed word by word, as an LLM would stream it, so the run exercises the same path as
the plugins (incremental tokenization, text lead, chunked audio). `--tiny` uses random tiny
weights written to a temporary directory: the audio is noise, useful only to check the plumbing.

Every argument is checked before the weights load (a real load takes minutes): the cheap checks
(text, output path, reference audio, checkpoint directories) run before torch is even imported,
then the device and the full configs. A mistake prints one line, `moss-tts: error: ...`, and exits
with code 2; an unexpected failure (a bug) prints one line and exits with 1. `--debug` adds the
traceback. Progress goes to stderr, the one-line summary to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from core.audio import check_reference_audio, read_audio
from core.errors import (
    CheckpointError,
    ContextOverflowError,
    InvalidAudioError,
    TextTooLongError,
)
from core.hub import (
    CODEC_SECTIONS,
    MODEL_SECTIONS,
    MODEL_TYPE,
    CheckpointKind,
    checkpoint_kind,
    local_dir_or_hub_id,
    read_json,
    resolve_pretrained,
    safetensors_files,
)

if TYPE_CHECKING:
    import torch

    from core import EngineConfig, SamplingParams

DEFAULT_MODEL = "OpenMOSS-Team/MOSS-TTS-Realtime"
DEFAULT_CODEC = "OpenMOSS-Team/MOSS-Audio-Tokenizer"
SAMPLE_RATE = 24000
USAGE_EXIT = 2  # the user can fix it: arguments, files, checkpoints
BUG_EXIT = 1
_USER_ERRORS = (CheckpointError, InvalidAudioError, TextTooLongError, ContextOverflowError)
_WHAT = {"model": "MOSS-TTS-Realtime model", "codec": "MOSS-Audio-Tokenizer codec"}
_FLAG = {"model": "--model", "codec": "--codec"}
_CODEC_FILES = ["*.json", "*.safetensors"]  # what MossAudioCodec.from_pretrained fetches


class CliError(Exception):
    """A problem the user can fix (argument, file, checkpoint): one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse's usage block is several lines; keep the one-line error contract."""
        raise CliError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moss-tts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    say = sub.add_parser("say", help="synthesize text into a WAV file")
    say.add_argument("text", help="text to speak ('-' reads stdin)")
    say.add_argument("-o", "--output", type=Path, required=True, help="output .wav path")
    say.add_argument("--voice", help="reference audio of the voice to clone (1-30 s)")
    say.add_argument("--model", help=f"model directory or hub id (default {DEFAULT_MODEL})")
    say.add_argument("--codec", help=f"codec directory or hub id (default {DEFAULT_CODEC})")
    say.add_argument("--tiny", action="store_true", help="random tiny weights (plumbing check)")
    say.add_argument("--device", default="auto",
                     help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    say.add_argument("--seed", type=int, default=None)
    say.add_argument("--temperature", type=float, default=0.8)
    say.add_argument("--max-frames", type=int, default=1500, help="frame cap per turn (80 ms)")
    say.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    serve = sub.add_parser("serve", help="serve the engine over WebSocket (docs/PROTOCOL.md)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--token-file", type=Path,
                       help="file holding the shared secret (default: $MOSS_SERVER_TOKEN)")
    serve.add_argument("--model", help=f"model directory or hub id (default {DEFAULT_MODEL})")
    serve.add_argument("--codec", help=f"codec directory or hub id (default {DEFAULT_CODEC})")
    serve.add_argument("--tiny", action="store_true", help="random tiny weights (plumbing check)")
    serve.add_argument("--device", default="auto",
                       help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    serve.add_argument("--max-streams", type=int, default=16, help="turns speaking at once")
    serve.add_argument("--max-conversations", type=int, default=64, help="open conversations")
    serve.add_argument("--compile", action="store_true",
                       help="CPU: compile the frame and codec steps at start (~45 s the first "
                            "time, ~11 s cached; EngineConfig.compile_step)")
    serve.add_argument("--ray", action="store_true",
                       help="scale out on Ray Serve: one engine replica per GPU behind Ray's "
                            "proxy, sticky by session (needs the `ray` extra)")
    serve.add_argument("--replicas", type=int, default=1, help="with --ray: engine replicas")
    serve.add_argument("--min-replicas", type=int, default=None,
                       help="with --ray and --max-replicas: autoscale on free conversation slots")
    serve.add_argument("--max-replicas", type=int, default=None)
    serve.add_argument("--replica-cpus", type=float, default=1.0,
                       help="with --ray on the CPU: CPUs reserved per replica")
    serve.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    token = sub.add_parser("token", help="print a client token signed with the server's secret")
    token.add_argument("--client", required=True,
                       help="the client's name (letters, digits, '-', '_'): its conversations "
                            "count against max_conversations_per_client")
    token.add_argument("--ttl", type=float, default=24 * 3600, help="seconds it stays valid")
    token.add_argument("--token-file", type=Path,
                       help="the server's secret (default: $MOSS_SERVER_TOKEN)")
    token.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def _note(message: str) -> None:
    """Progress on stderr, so stdout keeps only the summary line."""
    print(f"moss-tts: {message}", file=sys.stderr, flush=True)


def _deltas(text: str) -> list[str]:
    """Split like an LLM stream: words with their following whitespace."""
    return re.findall(r"\S+\s*|\s+", text)


# -- checks before anything slow: no torch, no network ----------------------------------------------
def _check_output(output: Path) -> Path:
    """The WAV must be creatable: probing now beats losing a finished synthesis at the end."""
    path = output.expanduser()
    if path.suffix.lower() != ".wav":
        raise CliError(f"-o {output}: the output must be a .wav file")
    if path.is_dir():
        raise CliError(f"-o {output}: is a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise CliError(f"-o {output}: exists and is not writable")
    existing = path.parent  # the directory is created at write time: probe its nearest ancestor
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"-o {output}: {existing} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".moss-tts-", suffix=".probe")
    except OSError as exc:
        raise CliError(f"-o {output}: cannot write in {existing} ({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(probe)
    return path


def _check_voice(voice: str) -> Path:
    """Same read and rules as `Engine.load_voice`, minus the codec (which needs the weights)."""
    path = Path(voice).expanduser()
    if not path.exists():
        raise CliError(f"--voice {voice}: no such file")
    if not path.is_file():
        raise CliError(f"--voice {voice}: not a file")
    if not os.access(path, os.R_OK):
        raise CliError(f"--voice {voice}: not readable (permission denied)")
    try:
        audio, rate = read_audio(path)
        check_reference_audio(audio, rate)
    except InvalidAudioError as exc:
        raise CliError(f"--voice {voice}: {exc}") from exc
    return path


def _check_checkpoint(directory: Path, want: CheckpointKind) -> None:
    """A local checkpoint must be the kind its flag names; swapped flags get said as such."""
    flag = _FLAG[want]
    try:
        config = read_json(directory / "config.json")
    except CheckpointError as exc:
        raise CliError(f"{flag}: {exc}; expected a {_WHAT[want]} checkpoint") from exc
    kind = checkpoint_kind(config)
    if kind is not None and kind != want:
        raise CliError(f"{flag} points at a {kind} checkpoint; did you swap --model and --codec?")
    if kind is None:
        sections = MODEL_SECTIONS if want == "model" else CODEC_SECTIONS
        missing = [key for key in sections if key not in config]
        why = (f"no {', '.join(missing)} in its config.json" if missing
               else f"config.json has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}")
        raise CliError(f"{flag} {directory}: not a {_WHAT[want]} checkpoint ({why})")
    try:
        safetensors_files(directory)
    except CheckpointError as exc:
        raise CliError(f"{flag}: {exc}") from exc


def _check_source(name: str, want: CheckpointKind) -> Path | str:
    """A local directory (checked now) or a hub id (fetched later, then checked the same way)."""
    try:
        local = local_dir_or_hub_id(name)
    except CheckpointError as exc:
        raise CliError(f"{_FLAG[want]}: {exc}") from exc
    if isinstance(local, Path):
        _check_checkpoint(local, want)
    return local


# -- checks that need torch, still before the weights ----------------------------------------------
def _check_device(device: str) -> torch.device:
    """The engine's `resolve_device` rule, plus what would otherwise fail only at load time."""
    import torch

    from core.device import resolve_device

    try:
        resolved = resolve_device(device)
    except ValueError as exc:
        raise CliError(f"--device: {exc}") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise CliError(f"--device {device}: only auto, cpu, cuda and cuda:N are supported")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
            raise CliError(f"--device {device}: torch {torch.__version__} sees no CUDA device "
                           f"({build}); use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise CliError(f"--device {device}: only {count} CUDA device(s) visible")
    return resolved


def _check_configs(model_dir: Path, codec_dir: Path) -> None:
    """Parse both configs fully now: a bad codec config must not wait for the model's weights."""
    from core.codec.config import CodecConfig
    from core.model.config import ModelConfig

    for flag, directory, parse in (("--model", model_dir, ModelConfig.from_dict),
                                   ("--codec", codec_dir, CodecConfig.from_dict)):
        try:
            parse(read_json(directory / "config.json"))
        except CheckpointError as exc:
            raise CliError(f"{flag} {directory}: {exc}") from exc


@dataclass(frozen=True)
class _Job:
    """Everything `say` needs once the arguments are checked."""

    text: str
    output: Path
    voice: Path | None
    device: torch.device
    engine_config: EngineConfig
    sampling: SamplingParams


def _job(args: argparse.Namespace, text: str, output: Path, voice: Path | None) -> _Job:
    from core import EngineConfig, SamplingParams

    device = _check_device(args.device)
    try:
        config = EngineConfig(max_streams=1, max_conversations=1, lead_s=None,
                              max_frames_per_turn=args.max_frames,
                              max_text_chars=max(20_000, len(text) + 1))
    except ValueError as exc:
        raise CliError(f"--max-frames: {exc}") from exc
    try:
        sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
    except ValueError as exc:
        raise CliError(f"--temperature/--seed: {exc}") from exc
    return _Job(text, output, voice, device, config, sampling)


# -- load, speak, write --------------------------------------------------------------------------
def _fetch(source: Path | str, want: CheckpointKind) -> Path:
    """Resolve a hub id to its snapshot before any weights load, and check it like a local dir."""
    if isinstance(source, Path):
        return source
    _note(f"fetching {want} {source} from the Hugging Face hub (or its cache) ...")
    patterns = _CODEC_FILES if want == "codec" else None
    try:
        directory = resolve_pretrained(source, allow_patterns=patterns)
    except CheckpointError as exc:
        raise CliError(f"{_FLAG[want]}: {exc}") from exc
    _check_checkpoint(directory, want)
    return directory


async def _say(job: _Job, model_dir: Path, codec_dir: Path, label: str) -> int:
    from core import Engine

    _note(f"loading {label} on {job.device} ...")
    started = time.monotonic()
    engine = Engine.from_pretrained(model_dir, codec_dir, device=job.device,
                                    config=job.engine_config)
    try:
        load_s = time.monotonic() - started
        _note(f"model and codec loaded in {load_s:.1f} s")
        voice = None
        if job.voice is not None:
            t = time.monotonic()
            voice = await engine.load_voice(job.voice)
            _note(f"voice {job.voice} encoded in {time.monotonic() - t:.1f} s")
        conv = engine.conversation(voice=voice, sampling=job.sampling)
        pcm: list[bytes] = []
        t0 = time.monotonic()
        first: float | None = None
        async with conv.speak() as stream:
            for delta in _deltas(job.text):
                stream.push_text(delta)
            stream.end_text()
            async for chunk in stream:
                first = first or time.monotonic() - t0
                pcm.append(chunk.pcm)
        elapsed = time.monotonic() - t0
    finally:
        engine.close()
    audio = np.frombuffer(b"".join(pcm), dtype="<i2")
    _write_wav(job.output, audio)
    seconds = audio.size / SAMPLE_RATE
    print(f"wrote {job.output}: {seconds:.2f} s of audio; load {load_s:.1f} s, "
          f"first audio {1000 * (first or 0):.0f} ms, generation {elapsed:.2f} s "
          f"(RTF {elapsed / max(seconds, 1e-9):.2f}) on {job.device}")
    return 0


def _write_wav(path: Path, audio: np.ndarray) -> None:
    import soundfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), audio, SAMPLE_RATE, subtype="PCM_16")
    except (OSError, RuntimeError) as exc:  # soundfile's LibsndfileError is a RuntimeError
        raise CliError(f"cannot write {path}: {exc}") from exc


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command == "token":
        return _token(args)
    if args.tiny and (args.model is not None or args.codec is not None):
        raise CliError("--tiny brings its own random weights; drop --model/--codec or --tiny")
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise CliError("nothing to say (empty text)")
    output = _check_output(args.output)
    voice = _check_voice(args.voice) if args.voice else None
    if voice is not None and voice.resolve() == output.resolve():
        raise CliError(f"-o {args.output}: would overwrite the --voice file")
    if args.tiny:
        job = _job(args, text, output, voice)
        from core.tiny import write_tiny

        _note("--tiny uses RANDOM weights: the output is noise")
        with tempfile.TemporaryDirectory(prefix="moss-tiny-") as tmp:
            model_dir, codec_dir = write_tiny(tmp)
            return asyncio.run(_say(job, model_dir, codec_dir, "tiny random model and codec"))
    model = _check_source(DEFAULT_MODEL if args.model is None else args.model, "model")
    codec = _check_source(DEFAULT_CODEC if args.codec is None else args.codec, "codec")
    job = _job(args, text, output, voice)
    model_dir, codec_dir = _fetch(model, "model"), _fetch(codec, "codec")
    _check_configs(model_dir, codec_dir)
    label = f"model {model} and codec {codec}"
    return asyncio.run(_say(job, model_dir, codec_dir, label))


def _token(args: argparse.Namespace) -> int:
    """`moss-tts token`: a signed, expiring client token (the secret never leaves the host)."""
    from core.server.auth import ServeError, read_token, sign_token

    try:
        print(sign_token(read_token(args.token_file), args.client, args.ttl))
    except (ServeError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Check the token, address and checkpoints first, then load once and serve until SIGTERM."""
    from core.server.auth import ServeError, read_token
    from core.server.run import ServeOptions, serve

    if args.tiny and (args.model is not None or args.codec is not None):
        raise CliError("--tiny brings its own random weights; drop --model/--codec or --tiny")
    if not 0 < args.port < 65536:
        raise CliError(f"--port {args.port}: not a TCP port")
    try:
        token = read_token(args.token_file)
    except ServeError as exc:
        raise CliError(str(exc)) from exc
    from core import Engine, EngineConfig

    device = _check_device(args.device)
    try:
        config = EngineConfig(max_streams=args.max_streams,
                              max_conversations=args.max_conversations,
                              compile_step=args.compile)
    except ValueError as exc:
        raise CliError(f"--max-streams/--max-conversations: {exc}") from exc
    if args.compile and device.type != "cpu":
        _note(f"--compile applies to the CPU only: on {device} the eager step runs")
    if args.ray:
        return _serve_ray(args, token, "cuda" if device.type == "cuda" else args.device, config)
    options = ServeOptions(host=args.host, port=args.port, token_file=args.token_file)
    with tempfile.TemporaryDirectory(prefix="moss-tiny-") as tmp:
        if args.tiny:
            from core.tiny import write_tiny

            _note("--tiny uses RANDOM weights: the audio is noise")
            model_dir, codec_dir = write_tiny(tmp)
        else:
            model = _check_source(DEFAULT_MODEL if args.model is None else args.model, "model")
            codec = _check_source(DEFAULT_CODEC if args.codec is None else args.codec, "codec")
            model_dir, codec_dir = _fetch(model, "model"), _fetch(codec, "codec")
            _check_configs(model_dir, codec_dir)
        _note(f"loading the engine on {device} ...")
        engine = Engine.from_pretrained(model_dir, codec_dir, device=device, config=config)
        if engine.warmup_s:
            _note(f"compiled the frame and codec steps in {engine.warmup_s:.1f} s")
        _note(f"serving on http://{args.host}:{args.port} (WebSocket /v1/conversation)")
        serve(engine, options, token)
    return 0


def _serve_ray(args: argparse.Namespace, token: str, device: str, config: EngineConfig) -> int:
    """`serve --ray`: each replica loads its own engine (checkpoints checked here first)."""
    try:
        from core.server.ray_serve import RayServeSpec, run
    except ImportError as exc:
        raise CliError(f"--ray needs Ray Serve: pip install 'moss-realtime-voice[ray]' ({exc})") from exc
    model = codec = None
    if not args.tiny:
        model = _check_source(DEFAULT_MODEL if args.model is None else args.model, "model")
        codec = _check_source(DEFAULT_CODEC if args.codec is None else args.codec, "codec")
    engine = {"max_streams": config.max_streams, "max_conversations": config.max_conversations,
              "compile_step": config.compile_step}
    try:  # local directories as absolute paths: a replica's working directory is Ray's
        spec = RayServeSpec(model=_source_arg(model), codec=_source_arg(codec), tiny=args.tiny,
                            device=device, engine=engine, replicas=args.replicas,
                            min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                            num_cpus=args.replica_cpus)
    except ValueError as exc:
        raise CliError(f"--replicas/--min-replicas/--max-replicas/--replica-cpus: {exc}") from exc
    if args.tiny:
        _note("--tiny uses RANDOM weights: the audio is noise")
    _note(f"serving on Ray Serve at http://{args.host}:{args.port} (WebSocket /v1/conversation)")
    run(spec, token, host=args.host, port=args.port)
    return 0


def _source_arg(source: Path | str | None) -> str | None:
    return str(source.resolve()) if isinstance(source, Path) else source


def _fail(exc: BaseException, code: int, debug: bool) -> int:
    """One line (messages with newlines are joined), or the full traceback with --debug."""
    if debug:
        traceback.print_exception(exc)
    message = " / ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if code == BUG_EXIT:
        message = f"unexpected {type(exc).__name__}: {message}" + (
            "" if debug else " (rerun with --debug for the traceback)")
    print(f"moss-tts: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of `moss-tts`; returns the exit code (0 ok, 1 bug, 2 user error, 130 ^C)."""
    logging.basicConfig(format="moss-tts: %(message)s")  # the device warning, as one line
    debug = False
    try:
        args = _parser().parse_args(argv)
        debug = args.debug
        return _run(args)
    except KeyboardInterrupt:
        print("moss-tts: interrupted", file=sys.stderr, flush=True)
        return 130
    except (CliError, *_USER_ERRORS) as exc:
        return _fail(exc, USAGE_EXIT, debug)
    except Exception as exc:  # a bug: still one line unless --debug
        return _fail(exc, BUG_EXIT, debug)


if __name__ == "__main__":
    sys.exit(main())
