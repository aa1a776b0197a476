"""What the wire costs: first audio through a `RemoteEngine` on loopback against the same engine
in process, same run, rounds interleaved.

    python benchmarks/remote.py --streams 1 16 --repeat 5 [--server process|inline]

`--server process` (the default) serves the engine from a second OS process, as deployed: the
parent writes the tiny checkpoint once, then re-runs this script with a hidden `--serve-child`
flag, which builds the same engine (same checkpoint, `EngineConfig` and thread count) and serves
it with `core.server.run.serve` (uvicorn) on 127.0.0.1 and a free port the parent chose. The
parent waits for `/ready`, measures its own in-process engine against the child through
`RemoteEngine`, and always stops the child (SIGTERM, then kill). `--server inline` serves the
parent's own engine on the parent's event loop instead (client, server and engine in one process).

Each round opens N conversations at once and paces text at 30 tokens/s; first audio is measured
from the 12th token (the lead: the engine cannot start earlier) to the first chunk, on the
caller's side. Each row also gives the frames/s of the rounds: audio received (sum of chunk
durations / 0.08 s) over the rounds' wall time, which the 30 tokens/s pacing bounds. Tiny random
weights on the CPU by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts, not a package

from engine import paced_feed, token_deltas  # noqa: E402

from core import Engine, EngineConfig, SamplingParams  # noqa: E402
from core.engine.metrics import percentile  # noqa: E402

FRAME_S = 0.08
TEXT = "Hello there, this is a short reply that the benchmark streams word by word. " * 2
TOKEN = "benchmark-token-0123456789"
READY_TIMEOUT_S = 180.0  # the child loads the engine before it listens
STOP_TIMEOUT_S = 15.0  # after SIGTERM, then kill
CHILD_GRACEFUL_S = 5.0


def build_engine(model_dir: str | Path, codec_dir: str | Path, n_max: int,
                 threads: int, lead_s: float | None = 1.5) -> Engine:
    """The engine under test, built the same way in the parent and in the serving child."""
    torch.set_num_threads(threads)
    config = EngineConfig(max_streams=n_max, max_conversations=2 * n_max, lead_s=lead_s,
                          max_frames_per_turn=120)
    return Engine.from_pretrained(model_dir, codec_dir, device="cpu", config=config)


async def first_audio(engine, n: int, deltas: list[str]) -> tuple[list[float], float, float]:
    """N conversations at once: seconds from the lead (12th token) to the first chunk of each,
    plus the audio received (s) and the round's wall time (s)."""
    audio_s = 0.0

    async def one(i: int) -> float:
        nonlocal audio_s
        conv = engine.conversation(sampling=SamplingParams(seed=i))
        stream = conv.speak()
        first_at: float | None = None
        feeder = asyncio.ensure_future(paced_feed(stream, deltas))
        try:
            async for chunk in stream:
                first_at = first_at or time.perf_counter()
                audio_s += chunk.duration_s
        finally:
            lead_at = await feeder
            await conv.aclose()
        assert first_at is not None
        return first_at - lead_at

    t0 = time.perf_counter()
    waits = list(await asyncio.gather(*(one(i) for i in range(n))))
    return waits, audio_s, time.perf_counter() - t0


async def main(args: argparse.Namespace) -> dict:
    from core.remote import RemoteEngine
    from core.tiny import write_tiny

    tmp = tempfile.mkdtemp(prefix="moss-bench-")
    model_dir, codec_dir = write_tiny(tmp)
    n_max = max(args.streams)
    engine = build_engine(model_dir, codec_dir, n_max, args.threads)
    deltas = token_deltas(engine.tokenizer, TEXT)
    if args.server == "inline":
        from core.server.run import serving

        async with serving(engine, token=TOKEN) as url:
            return await _compare(engine, RemoteEngine(url, token=TOKEN), deltas, args)
    log_path = Path(tmp) / "server.log"
    try:
        child = ChildServer(model_dir, codec_dir, n_max, args.threads, log_path)
        with child as url:
            result = await _compare(engine, RemoteEngine(url, token=TOKEN), deltas, args)
    except BaseException:
        engine.close()  # _compare closes it once it starts; closing twice is harmless
        raise
    result["server_log"] = str(log_path)
    result["server_exit_code"] = child.returncode
    result["server_log_errors"] = _report_log(log_path)
    return result


class ChildServer:
    """Run `--serve-child` in a separate OS process; yields its URL once `/ready` says so, and
    always stops it on exit (SIGTERM, then kill after STOP_TIMEOUT_S)."""

    def __init__(self, model_dir: Path, codec_dir: Path, n_max: int, threads: int,
                 log_path: Path) -> None:
        self.argv = [sys.executable, str(Path(__file__).resolve()), "--serve-child",
                     "--model-dir", str(model_dir), "--codec-dir", str(codec_dir),
                     "--max-streams", str(n_max), "--threads", str(threads)]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def __enter__(self) -> str:
        port = _free_port()
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        env = dict(os.environ, MOSS_BENCH_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
        # stdin stays a pipe from us: when this process dies, the child sees EOF and stops.
        url = f"http://127.0.0.1:{port}"
        try:
            self.proc = subprocess.Popen([*self.argv, "--port", str(port)],
                                         stdin=subprocess.PIPE, stdout=self.log,
                                         stderr=subprocess.STDOUT, env=env)
            _wait_ready(self.proc, url, READY_TIMEOUT_S, self.log_path)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        print(f"server: pid {self.proc.pid} at {url} (log {self.log_path})", file=sys.stderr,
              flush=True)
        return url

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    print(f"server: pid {proc.pid} ignored SIGTERM for {STOP_TIMEOUT_S:g} s; "
                          "killing it", file=sys.stderr, flush=True)
                    proc.kill()
                    proc.wait()
                self.returncode = proc.returncode
                if proc.returncode != 0:
                    print(f"server: exited with code {proc.returncode} (log {self.log_path})",
                          file=sys.stderr, flush=True)
            finally:
                if proc.stdin is not None:
                    proc.stdin.close()
        self.log.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    """Poll `/ready` until it answers 200; fail early if the child exits, or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server process exited with code {proc.returncode} before "
                               f"it was ready:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while it is not ready
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server process was not ready within {timeout_s:g} s:\n"
                               f"{_tail(log_path)}")
        time.sleep(0.2)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _report_log(path: Path) -> int:
    """Count the server's errors and tracebacks, and show them on stderr."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return 0
    bad = [line for line in text
           if any(word in line.lower() for word in ("traceback", "error", "fatal"))]
    if bad:
        print(f"server: {len(bad)} error line(s) in {path}; last lines:\n{_tail(path, 30)}",
              file=sys.stderr, flush=True)
    return len(bad)


def serve_child(args: argparse.Namespace) -> None:
    """`--serve-child`: build the engine as the parent does and serve it until SIGTERM."""
    from core.server.run import ServeOptions, serve

    engine = build_engine(args.model_dir, args.codec_dir, args.max_streams, args.threads)

    def orphan_watch() -> None:  # the parent holds our stdin: EOF means it is gone
        # os.read, not sys.stdin: a daemon thread blocked inside the buffered reader would hold
        # its lock and abort the interpreter's shutdown.
        while os.read(0, 4096):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphan_watch, daemon=True).start()
    print(f"serve-child: engine ready, pid {os.getpid()}, serving on 127.0.0.1:{args.port}",
          flush=True)
    serve(engine, ServeOptions(host="127.0.0.1", port=args.port, graceful_s=CHILD_GRACEFUL_S),
          os.environ["MOSS_BENCH_TOKEN"])


async def _compare(engine, remote, deltas: list[str], args: argparse.Namespace) -> dict:
    rows = []
    try:
        warm = min(2, max(args.streams))
        await first_audio(engine, warm, deltas)  # warm-up, both paths
        await first_audio(remote, warm, deltas)
        for n in args.streams:
            local_all: list[float] = []
            remote_all: list[float] = []
            local_audio = local_wall = remote_audio = remote_wall = 0.0
            for _ in range(args.repeat):  # interleaved: drift hits both alike
                waits, audio_s, wall_s = await first_audio(engine, n, deltas)
                local_all += waits
                local_audio += audio_s
                local_wall += wall_s
                waits, audio_s, wall_s = await first_audio(remote, n, deltas)
                remote_all += waits
                remote_audio += audio_s
                remote_wall += wall_s
            row = {"streams": n,
                   "local_p50_ms": 1000 * percentile(local_all, 50),
                   "local_p95_ms": 1000 * percentile(local_all, 95),
                   "remote_p50_ms": 1000 * percentile(remote_all, 50),
                   "remote_p95_ms": 1000 * percentile(remote_all, 95)}
            row["p95_overhead_ms"] = row["remote_p95_ms"] - row["local_p95_ms"]
            row["local_frames_per_s"] = local_audio / FRAME_S / local_wall
            row["remote_frames_per_s"] = remote_audio / FRAME_S / remote_wall
            rows.append(row)
            print(f"N={n:3d}  first audio p50/p95: in process {row['local_p50_ms']:6.1f} / "
                  f"{row['local_p95_ms']:6.1f} ms, remote {row['remote_p50_ms']:6.1f} / "
                  f"{row['remote_p95_ms']:6.1f} ms, p95 overhead {row['p95_overhead_ms']:+.1f} ms"
                  f"  | frames/s in process {row['local_frames_per_s']:6.1f}, "
                  f"remote {row['remote_frames_per_s']:6.1f}", flush=True)
    finally:
        await remote.aclose()
        engine.close()
    return {"bench": "remote", "dims": "tiny", "device": "cpu", "server": args.server,
            "threads": args.threads, "repeat": args.repeat, "rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--server", choices=("inline", "process"), default="process",
                        help="process: serve from a separate OS process (default); inline: on "
                             "this process's event loop")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--codec-dir", help=argparse.SUPPRESS)
    parser.add_argument("--max-streams", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve_child:
        serve_child(parsed)
    else:
        print(json.dumps(asyncio.run(main(parsed))))
