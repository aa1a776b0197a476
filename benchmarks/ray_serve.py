"""What Ray Serve costs and gives: first audio through Ray's proxy against the same engine in
process, and the frames/s of 64 conversations over 2 replicas against one in-process engine.

    python benchmarks/ray_serve.py --streams 1 16 --repeat 3 --capacity 64

Starts a local Ray cluster (2 CPUs, loopback), deploys `core.server.ray_serve` with 2 replicas
of the tiny checkpoint (each writes the same seeded weights), and compares, in one run:
- first audio (text paced at 30 tokens/s, from the 12th token to the first chunk, as
  benchmarks/remote.py), N conversations at once, rounds interleaved with the in-process engine;
- capacity: `--capacity` conversations speak a long text given at once (no pacing); aggregate
  audio frames/s over the round's wall time, in process (one engine, one thread) and over the
  2 replicas (one thread each; the sessions spread by the consistent hash).
On a 2-core machine the client, Ray's proxy and both replicas share the two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import token_deltas  # noqa: E402
from remote import FRAME_S, TEXT, TOKEN, build_engine, first_audio  # noqa: E402

from core import SamplingParams  # noqa: E402
from core.engine.metrics import percentile  # noqa: E402

LONG_TEXT = "This sentence keeps the engine busy for the whole turn, word after word. " * 4


async def capacity(engine, n: int) -> float:
    """N conversations speak a long text given at once: aggregate frames/s."""

    async def one(i: int) -> float:
        conv = engine.conversation(sampling=SamplingParams(seed=i))
        stream = conv.speak()
        stream.push_text(LONG_TEXT)
        stream.end_text()
        audio = 0.0
        try:
            async for chunk in stream:
                audio += chunk.duration_s
        finally:
            await conv.aclose()
        return audio

    start = time.perf_counter()
    audio = sum(await asyncio.gather(*(one(i) for i in range(n))))
    return audio / FRAME_S / (time.perf_counter() - start)


async def latency(args: argparse.Namespace, url: str, engine) -> list[dict]:
    from core.remote import RemoteEngine

    remote = RemoteEngine(url, token=TOKEN)
    deltas = token_deltas(engine.tokenizer, TEXT)
    rows = []
    try:
        await first_audio(engine, 2, deltas)  # warm-up, both paths
        await first_audio(remote, 4, deltas)
        for n in args.streams:
            local: list[float] = []
            ray: list[float] = []
            for _ in range(args.repeat):
                local += (await first_audio(engine, n, deltas))[0]
                ray += (await first_audio(remote, n, deltas))[0]
            row = {"streams": n, "local_p50_ms": 1000 * percentile(local, 50),
                   "local_p95_ms": 1000 * percentile(local, 95),
                   "ray_p50_ms": 1000 * percentile(ray, 50), "ray_p95_ms": 1000 * percentile(ray, 95)}
            row["p95_overhead_ms"] = row["ray_p95_ms"] - row["local_p95_ms"]
            rows.append(row)
            print(f"N={n:3d}  first audio p50/p95: in process {row['local_p50_ms']:6.1f} / "
                  f"{row['local_p95_ms']:6.1f} ms, Ray {row['ray_p50_ms']:6.1f} / "
                  f"{row['ray_p95_ms']:6.1f} ms, p95 overhead {row['p95_overhead_ms']:+.1f} ms",
                  flush=True)
    finally:
        await remote.aclose()
    return rows


async def capacities(args: argparse.Namespace, url: str, engine) -> dict:
    from core.remote import RemoteEngine

    remote = RemoteEngine(url, token=TOKEN)
    cap: dict = {"conversations": args.capacity, "local_frames_per_s": [], "ray_frames_per_s": []}
    try:
        await capacity(remote, 4)  # warm-up
        for _ in range(args.repeat):
            cap["local_frames_per_s"].append(await capacity(engine, args.capacity))
            cap["ray_frames_per_s"].append(await capacity(remote, args.capacity))
    finally:
        await remote.aclose()
    print(f"capacity, {args.capacity} conversations: in process "
          f"{max(cap['local_frames_per_s']):.0f} frames/s, 2 Ray replicas "
          f"{max(cap['ray_frames_per_s']):.0f} frames/s (best of {args.repeat})", flush=True)
    return cap


def main(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from core.server.ray_serve import RayServeSpec, deployment
    from core.tiny import write_tiny

    n_max = max(max(args.streams), args.capacity)
    tmp = tempfile.mkdtemp(prefix="moss-bench-")
    model_dir, codec_dir = write_tiny(tmp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict = {"bench": "ray_serve", "dims": "tiny", "device": "cpu", "replicas": 2,
                 "repeat": args.repeat}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # latency with the real-time lead cap (as deployed), capacity without it (unpaced)
        for phase, lead_s in (("rows", 1.5), ("capacity", None)):
            engine = build_engine(model_dir, codec_dir, n_max, 1, lead_s=lead_s)
            try:
                spec = RayServeSpec(tiny=True, device="cpu", replicas=2, num_cpus=0.5, engine={
                    "max_streams": n_max, "max_conversations": 2 * n_max, "lead_s": lead_s,
                    "max_frames_per_turn": engine.config.max_frames_per_turn})
                serve.run(deployment(spec, TOKEN), name="bench", route_prefix="/")
                bench = latency if phase == "rows" else capacities
                out[phase] = asyncio.run(bench(args, url, engine))
            finally:
                engine.close()
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--capacity", type=int, default=64)
    print(json.dumps(main(parser.parse_args())))
