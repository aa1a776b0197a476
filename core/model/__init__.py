"""MOSS-TTS-Realtime network: config, backbone + depth transformer, KV pool, batched sampler."""

from core.model.config import ModelConfig, TransformerConfig
from core.model.generate import TurnResult, generate_turn
from core.model.kv_cache import KVPool
from core.model.moss import MossTTSRealtime
from core.model.sampling import SamplerBatch
from core.values import SamplingParams

__all__ = [
    "KVPool",
    "ModelConfig",
    "MossTTSRealtime",
    "SamplerBatch",
    "SamplingParams",
    "TransformerConfig",
    "TurnResult",
    "generate_turn",
]
