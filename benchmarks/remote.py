"""What the wire costs: first audio through a loopback `RemoteEngine` against the same engine
in process, same run, rounds interleaved.

    python benchmarks/remote.py --streams 1 16 --repeat 5

Each round opens N conversations at once and paces text at 30 tokens/s; first audio is measured
from the 12th token (the lead: the engine cannot start earlier) to the first chunk, on the
caller's side. Tiny random weights on the CPU by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import Engine, EngineConfig, SamplingParams  # noqa: E402
from core.engine.metrics import percentile  # noqa: E402

TOKENS_PER_S = 30.0
TEXT = "Hello there, this is a short reply that the benchmark streams word by word. " * 2
TOKEN = "benchmark-token-0123456789"


async def first_audio(engine, n: int, deltas: list[str]) -> list[float]:
    """N conversations at once: seconds from the lead (12th token) to the first chunk."""

    async def one(i: int) -> float:
        conv = engine.conversation(sampling=SamplingParams(seed=i))
        stream = conv.speak()
        lead_at: float | None = None
        first_at: float | None = None

        async def feed() -> None:
            nonlocal lead_at
            t0 = time.perf_counter()
            for k, delta in enumerate(deltas):
                await asyncio.sleep(max(0.0, t0 + k / TOKENS_PER_S - time.perf_counter()))
                stream.push_text(delta)
                if k == 11:
                    lead_at = time.perf_counter()
            stream.end_text()

        feeder = asyncio.ensure_future(feed())
        try:
            async for _ in stream:
                first_at = first_at or time.perf_counter()
        finally:
            await feeder
            await conv.aclose()
        assert lead_at is not None and first_at is not None
        return first_at - lead_at

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def main(args: argparse.Namespace) -> dict:
    from core.remote import RemoteEngine
    from core.server.run import serving
    from core.tiny import write_tiny

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="moss-bench-")
    model_dir, codec_dir = write_tiny(tmp)
    n_max = max(args.streams)
    config = EngineConfig(max_streams=n_max, max_conversations=2 * n_max, lead_s=1.5,
                          max_frames_per_turn=120)
    engine = Engine.from_pretrained(model_dir, codec_dir, device="cpu", config=config)
    tok = engine.tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    deltas = [tok.decode(ids[:k + 1])[len(tok.decode(ids[:k])):] for k in range(len(ids))]
    async with serving(engine, token=TOKEN) as url:
        return await _compare(engine, RemoteEngine(url, token=TOKEN), deltas, args)


async def _compare(engine, remote, deltas: list[str], args: argparse.Namespace) -> dict:
    rows = []
    try:
        warm = min(2, max(args.streams))
        await first_audio(engine, warm, deltas)  # warm-up, both paths
        await first_audio(remote, warm, deltas)
        for n in args.streams:
            local_all: list[float] = []
            remote_all: list[float] = []
            for _ in range(args.repeat):  # interleaved: drift hits both alike
                local_all += await first_audio(engine, n, deltas)
                remote_all += await first_audio(remote, n, deltas)
            row = {"streams": n,
                   "local_p50_ms": 1000 * percentile(local_all, 50),
                   "local_p95_ms": 1000 * percentile(local_all, 95),
                   "remote_p50_ms": 1000 * percentile(remote_all, 50),
                   "remote_p95_ms": 1000 * percentile(remote_all, 95)}
            row["p95_overhead_ms"] = row["remote_p95_ms"] - row["local_p95_ms"]
            rows.append(row)
            print(f"N={n:3d}  first audio p50/p95: in process {row['local_p50_ms']:6.1f} / "
                  f"{row['local_p95_ms']:6.1f} ms, remote {row['remote_p50_ms']:6.1f} / "
                  f"{row['remote_p95_ms']:6.1f} ms, p95 overhead {row['p95_overhead_ms']:+.1f} ms",
                  flush=True)
    finally:
        await remote.aclose()
        engine.close()
    return {"bench": "remote", "dims": "tiny", "device": "cpu", "repeat": args.repeat,
            "rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
