"""Shared by the engine tests: the tiny parts loaded once per module, and a small test engine."""

from __future__ import annotations

from pathlib import Path

import torch

from core import Engine, EngineConfig
from core.codec import MossAudioCodec
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
    return Engine(model or base_model, codec, tok, config=EngineConfig(**cfg))
