"""Shared by the engine tests: the tiny parts loaded once per module, and a small test engine."""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from core import Conversation, Engine, EngineConfig
from core.codec import MossAudioCodec
from core.engine.conv_state import ConvState
from core.model import MossTTSRealtime
from core.text import load_tokenizer

Parts = tuple[MossTTSRealtime, MossAudioCodec, object]


def load_parts(tiny_dirs: tuple[Path, Path], dtype: torch.dtype = torch.float32) -> Parts:
    """Model (in `dtype`), codec and tokenizer; each test builds its own Engine around them."""
    model_dir, codec_dir = tiny_dirs
    model = MossTTSRealtime.from_pretrained(model_dir, dtype=torch.float32).to(dtype)
    return model, MossAudioCodec.from_pretrained(codec_dir), load_tokenizer(model_dir)


def build_engine(parts: Parts, model: MossTTSRealtime | None = None, **overrides) -> Engine:
    """A small engine: 4 streams, 8 conversations, 40 frames per turn, 512 blocks of 16 rows."""
    cfg = dict(max_streams=4, max_conversations=8, max_frames_per_turn=40, kv_block_size=16,
               kv_num_blocks=512, lead_s=None)
    cfg.update(overrides)
    base_model, codec, tok = parts
    engine = Engine(model or base_model, codec, tok, config=EngineConfig(**cfg))
    _engines[id(engine._inbox)] = engine
    return engine


_engines: weakref.WeakValueDictionary[int, Engine] = weakref.WeakValueDictionary()
KINDS = ("local", "remote")  # parametrize public-interface tests over both engines


@contextlib.asynccontextmanager
async def open_engine(kind: str, parts: Parts, **overrides) -> AsyncIterator:
    """`build_engine`'s engine itself ("local"), or a `RemoteEngine` to it served on loopback
    ("remote"): the public interface must behave alike over the wire."""
    engine = build_engine(parts, **overrides)
    try:
        if kind == "local":
            yield engine
            return
        from core.remote import RemoteEngine
        from core.server.run import serving

        token = "engine-kit-token-0123456789"
        async with serving(engine, token=token) as url:
            remote = RemoteEngine(url, token=token)
            try:
                yield remote
            finally:
                await remote.aclose()
    finally:
        engine.close()


def state_of(conv: Conversation, limit_s: float = 5.0) -> ConvState:
    """The engine thread's record of `conv` (history, KV cache, finished turns): engine
    internals, read by tests that check exactness; waits for its open command to have run."""
    engine = _engines[id(conv._inbox)]
    deadline = time.monotonic() + limit_s
    while (cs := engine._loop.convs.get(conv.conv_id)) is None:
        assert time.monotonic() < deadline, "the conversation never reached the engine thread"
        time.sleep(0.001)
    return cs


async def say_all(stream, text: str) -> list:
    """Push `text` in one delta, end it, and collect every chunk (any stream: local or remote)."""
    stream.push_text(text)
    stream.end_text()
    return [c async for c in stream]


async def until(pred, limit_s: float = 10.0) -> None:
    """Poll an engine-side condition with a hard limit (not a sleep that hides a race)."""
    deadline = time.monotonic() + limit_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
