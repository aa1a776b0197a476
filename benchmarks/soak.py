"""Soak: many conversations, thousands of turns; the process's memory must stay flat after warm-up.

    .venv/bin/python benchmarks/soak.py                       # 16 conversations, 3,000 turns, tiny
    .venv/bin/python benchmarks/soak.py --kv-blocks 160       # a small pool: evictions, rebuilds
    .venv/bin/python benchmarks/soak.py --objects --trim      # where memory goes, if it grows

Every conversation loops: a user turn, then an assistant turn of random text. Some turns are
interrupted (`cancel(played_s)` after a random number of chunks), some are cut late (after they
finished, as a framework does when playback stops), and some conversations are closed and
replaced by new ones (churn). The tiny checkpoint (`core.tiny.write_tiny`) runs on the CPU.

Prints VmRSS (/proc/self/status) every `--every` turns and, at the end, the growth in MiB per
1,000 turns after `--warmup` turns (least-squares slope over those samples), the engine's stats
and one JSON line. `--trim` calls glibc's malloc_trim(0) before each sample, which separates
memory still referenced from memory the allocator merely kept; `--objects` prints the Python
object types whose counts grew after warm-up (gc.get_objects) and `--tracemalloc` the
allocation sites that grew (slow).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import gc
import json
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import Conversation, Engine, EngineConfig, MossError, SamplingParams  # noqa: E402
from core.tiny import write_tiny  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars shine above "
         "quiet fields and every small village sleeps").split()


def rss_mib() -> float:
    """Resident memory of this process (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def malloc_trim() -> None:
    """Give the allocator's free memory back to the system (glibc only; else a no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def slope_per_1000(points: list[tuple[int, float]]) -> float | None:
    """Least-squares MiB per 1,000 turns over (turns, MiB) points."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(m for _, m in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return None if var == 0 else 1000.0 * sum((t - mx) * (m - my) for t, m in points) / var


def object_counts() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


class Soak:
    """The conversation loops, the turn counter and the samples."""

    def __init__(self, engine: Engine, args: argparse.Namespace) -> None:
        self.engine, self.args = engine, args
        self.rng = random.Random(args.seed)
        self.turns = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.samples: list[tuple[int, float]] = []
        self.baseline_objects: collections.Counter[str] | None = None
        self.baseline_trace: tracemalloc.Snapshot | None = None
        self.baselined = False
        self.speakers = asyncio.Semaphore(args.speakers or args.conversations)
        self.started = time.monotonic()

    def text(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choices(WORDS, k=self.rng.randint(lo, hi))) + "."

    async def run(self) -> None:
        self.sample()
        await asyncio.gather(*(self.dialogue(i) for i in range(self.args.conversations)))

    async def dialogue(self, i: int) -> None:
        seeds = iter(range(i * 1_000_000, (i + 1) * 1_000_000))
        conv = self.engine.conversation(sampling=SamplingParams(seed=next(seeds)))
        try:
            while self.turns < self.args.turns:
                if self.rng.random() < self.args.churn:
                    conv.close()
                    conv = self.engine.conversation(sampling=SamplingParams(seed=next(seeds)))
                await self.turn(conv)
        finally:
            conv.close()

    async def turn(self, conv: Conversation) -> None:
        rng = self.rng
        try:
            await conv.add_user_turn(text=self.text(2, 10))
            async with self.speakers:
                stream = conv.speak()
                stream.push_text(self.text(3, 16))
                stream.end_text()
                cut_at = rng.randint(1, 5) if rng.random() < self.args.interrupt else None
                n = 0
                async for _ in stream:
                    n += 1
                    if n == cut_at:
                        stream.cancel(played_s=rng.uniform(0.0, 0.5))
                        break
            if cut_at is None and rng.random() < self.args.late_cut:
                stream.cancel(played_s=rng.uniform(0.0, 1.0))  # playback stopped after the end
        except MossError as exc:
            self.errors[type(exc).__name__] += 1
        self.turns += 1
        if self.turns % self.args.every == 0:
            self.sample()

    def sample(self) -> None:
        if self.args.trim:
            gc.collect()
            malloc_trim()
        mib = rss_mib()
        self.samples.append((self.turns, mib))
        stats = self.engine.stats()
        print(f"turns {self.turns:6d}  rss {mib:8.1f} MiB  t {time.monotonic() - self.started:6.1f} s"
              f"  evictions {stats.kv_evictions}  kv_rows_free {stats.kv_rows_free}", flush=True)
        if self.turns >= self.args.warmup and not self.baselined:
            self.baselined = True
            if self.args.objects:
                self.baseline_objects = object_counts()
            if self.args.tracemalloc:
                self.baseline_trace = tracemalloc.take_snapshot()

    def report(self) -> dict[str, object]:
        after = [(t, m) for t, m in self.samples if t >= self.args.warmup]
        slope = slope_per_1000(after)
        growth = after[-1][1] - after[0][1] if len(after) > 1 else None
        stats = self.engine.stats()
        if self.args.trim:
            gc.collect()
            malloc_trim()
        closed = rss_mib()  # every conversation is closed by now: not part of the slope
        print(f"\n{self.turns} turns in {time.monotonic() - self.started:.0f} s; errors "
              f"{dict(self.errors) or 'none'}")
        print(f"RSS after warm-up ({self.args.warmup} turns): {after[0][1]:.1f} -> "
              f"{after[-1][1]:.1f} MiB; slope {slope:+.2f} MiB per 1,000 turns; "
              f"{closed:.1f} MiB with every conversation closed")
        print(f"engine: {stats}")
        if self.baseline_objects is not None:
            grown = object_counts() - self.baseline_objects
            print("object types grown after warm-up:", grown.most_common(12) or "none")
        if self.baseline_trace is not None:
            top = tracemalloc.take_snapshot().compare_to(self.baseline_trace, "lineno")[:10]
            print("allocation sites grown after warm-up:")
            for stat in top:
                print("  ", stat)
        return {
            "turns": self.turns, "conversations": self.args.conversations,
            "kv_blocks": self.engine.kv.num_blocks, "kv_block_size": self.engine.kv.block_size,
            "warmup": self.args.warmup, "rss_mib": self.samples,
            "growth_after_warmup_mib": growth, "mib_per_1000_turns": slope,
            "rss_closed_mib": closed,
            "errors": dict(self.errors), "kv_evictions": stats.kv_evictions,
            "kv_rebuilds": stats.kv_rebuilds, "turns_failed": stats.turns_failed,
            "trim": self.args.trim,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--speakers", type=int, default=None,
                   help="conversations speaking at once (default: all)")
    p.add_argument("--max-context-rows", type=int, default=EngineConfig().max_context_rows)
    p.add_argument("--turns", type=int, default=3000, help="stop after this many turns")
    p.add_argument("--warmup", type=int, default=1500, help="turns before the slope counts")
    p.add_argument("--every", type=int, default=250, help="sample RSS every this many turns")
    p.add_argument("--kv-blocks", type=int, default=None, help="KV pool blocks (None: default)")
    p.add_argument("--kv-block-size", type=int, default=16)
    p.add_argument("--max-frames", type=int, default=40, help="frame cap per turn")
    p.add_argument("--interrupt", type=float, default=0.3, help="share of turns interrupted")
    p.add_argument("--late-cut", type=float, default=0.2, help="share cut after they finished")
    p.add_argument("--churn", type=float, default=0.05, help="share of turns in a new room")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trim", action="store_true", help="malloc_trim(0) before each sample")
    p.add_argument("--objects", action="store_true", help="object types grown after warm-up")
    p.add_argument("--tracemalloc", action="store_true", help="allocation sites grown (slow)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p.parse_args(argv)


async def main(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    if args.tracemalloc:
        tracemalloc.start(8)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, codec_dir = write_tiny(Path(tmp))
        config = EngineConfig(
            max_streams=args.conversations, max_conversations=args.conversations,
            max_frames_per_turn=args.max_frames, kv_block_size=args.kv_block_size,
            kv_num_blocks=args.kv_blocks, lead_s=None, max_context_rows=args.max_context_rows,
        )
        engine = Engine.from_pretrained(model_dir, codec_dir, device="cpu", config=config)
        try:
            soak = Soak(engine, args)
            await soak.run()
            return soak.report()
        finally:
            await engine.aclose()


if __name__ == "__main__":
    result = asyncio.run(main(parse_args()))
    print(json.dumps(result))
