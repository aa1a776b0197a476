"""ModelConfig: the official MossTTSRealtime `config.json`, validated into frozen dataclasses.

The checkpoint config nests a Qwen3 `language_config` (backbone) and a `local_config` (depth
transformer). Both RoPE spellings seen in the wild are accepted: the older `rope_theta` (+
`rope_scaling`) form and transformers 5's `rope_parameters`. Every malformed or missing field
raises `CheckpointError` naming the field, so a bad download fails at load time, not mid-forward.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from core.errors import CheckpointError

AUDIO_PAD_CODE = 1024
AUDIO_BOS_CODE = 1025
AUDIO_EOS_CODE = 1026
_QWEN3_HEAD_DIM = 128


@dataclass(frozen=True)
class TransformerConfig:
    """Dimensions of one Qwen3-style decoder stack (backbone or local)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_factor: float = 1.0  # linear RoPE scaling: positions are divided by it
    max_position_embeddings: int = 40960

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim must be even for RoPE, got {self.head_dim}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the network needs; `raw` keeps the original dict for `save_pretrained`."""

    backbone: TransformerConfig
    local: TransformerConfig
    text_vocab_size: int
    text_pad_id: int
    audio_pad_text_id: int  # `<|audio_pad|>`: the config's `reference_audio_pad`
    rvq: int = 16
    audio_vocab_size: int = 1027
    audio_pad_code: int = AUDIO_PAD_CODE
    audio_bos_code: int = AUDIO_BOS_CODE
    audio_eos_code: int = AUDIO_EOS_CODE
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def row_width(self) -> int:
        """Columns of one input row: text id + one code per codebook."""
        return 1 + self.rvq

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Validate an official `config.json` dict."""
        if not isinstance(cfg, dict):
            raise CheckpointError(f"config must be a JSON object, got {type(cfg).__name__}")
        lang = _sub(cfg, "language_config")
        local = _sub(cfg, "local_config")
        backbone = _transformer(lang, "language_config")
        local_tc = _transformer(local, "local_config")
        rvq = _int(cfg, "rvq", "", default=16)
        audio_vocab = _int(cfg, "audio_vocab_size", "", default=1027)
        pad = _int(cfg, "audio_pad_token", "", default=AUDIO_PAD_CODE)
        if rvq != 16:
            raise CheckpointError(f"config field 'rvq' must be 16 (MOSS-TTS-Realtime), got {rvq}")
        if audio_vocab != 1027 or pad != AUDIO_PAD_CODE:
            raise CheckpointError(
                "config fields 'audio_vocab_size'/'audio_pad_token' must be 1027/1024, got "
                f"{audio_vocab}/{pad}"
            )
        if local_tc.hidden_size != backbone.hidden_size:
            raise CheckpointError(
                f"local_config.hidden_size ({local_tc.hidden_size}) must equal "
                f"language_config.hidden_size ({backbone.hidden_size}): there is no projection"
            )
        vocab = _int(lang, "vocab_size", "language_config.")
        text_pad = _int(cfg, "text_pad", "")
        audio_pad_text = _int(cfg, "reference_audio_pad", "")
        for name, value in (("text_pad", text_pad), ("reference_audio_pad", audio_pad_text)):
            if not 0 <= value < vocab:
                raise CheckpointError(f"config field {name!r}={value} is outside the text vocab")
        return cls(
            backbone=backbone,
            local=local_tc,
            text_vocab_size=vocab,
            text_pad_id=text_pad,
            audio_pad_text_id=audio_pad_text,
            rvq=rvq,
            audio_vocab_size=audio_vocab,
            audio_pad_code=pad,
            raw=copy.deepcopy(cfg),
        )

    def to_dict(self) -> dict[str, Any]:
        """The official dict (the original one when read from disk)."""
        return copy.deepcopy(self.raw)


def _sub(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    value = cfg.get(name)
    if not isinstance(value, dict):
        raise CheckpointError(f"config field {name!r} is missing or not an object")
    return value


def _int(cfg: dict[str, Any], name: str, prefix: str, default: int | None = None) -> int:
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(
            f"config field '{prefix}{name}' must be a non-negative int, got {value!r}"
        )
    return value


def _float(cfg: dict[str, Any], name: str, prefix: str, default: float | None = None) -> float:
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise CheckpointError(
            f"config field '{prefix}{name}' must be a positive number, got {value!r}"
        )
    return float(value)


def _rope(cfg: dict[str, Any], prefix: str) -> tuple[float, float]:
    """(theta, linear factor) from either `rope_parameters` or `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise CheckpointError(f"config field '{prefix}rope_parameters' must be an object")
        theta = _float(params, "rope_theta", f"{prefix}rope_parameters.")
        scaling: Any = params
    else:
        theta = _float(cfg, "rope_theta", prefix)
        scaling = cfg.get("rope_scaling")
    if scaling is None:
        return theta, 1.0
    if not isinstance(scaling, dict):
        raise CheckpointError(f"config field '{prefix}rope_scaling' must be an object or null")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, 1.0
    if kind == "linear":
        return theta, _float(scaling, "factor", f"{prefix}rope_scaling.", default=1.0)
    raise CheckpointError(f"config field '{prefix}rope type' {kind!r} is not supported")


def _transformer(cfg: dict[str, Any], section: str) -> TransformerConfig:
    p = f"{section}."
    hidden = _int(cfg, "hidden_size", p)
    heads = _int(cfg, "num_attention_heads", p)
    if heads == 0:
        raise CheckpointError(f"config field '{p}num_attention_heads' must be positive")
    # Qwen3Config (and upstream's local config) default head_dim to 128, not hidden // heads.
    head_dim = _int(cfg, "head_dim", p, default=_QWEN3_HEAD_DIM)
    kv_heads = _int(cfg, "num_key_value_heads", p, default=heads)
    if kv_heads == 0:
        raise CheckpointError(f"config field '{p}num_key_value_heads' must be positive")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config field '{p}hidden_act' must be 'silu', got {act!r}")
    if cfg.get("attention_bias", False):
        raise CheckpointError(f"config field '{p}attention_bias' must be false")
    theta, factor = _rope(cfg, p)
    num_layers = _int(cfg, "num_hidden_layers", p)
    _check_full_attention(cfg, p, num_layers)
    return TransformerConfig(
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_int(cfg, "intermediate_size", p),
        rms_norm_eps=_float(cfg, "rms_norm_eps", p, default=1e-6),
        rope_theta=theta,
        rope_factor=factor,
        max_position_embeddings=_int(cfg, "max_position_embeddings", p, default=40960),
    )


def _check_full_attention(cfg: dict[str, Any], prefix: str, num_layers: int) -> None:
    """Reject Qwen3 sliding-window layers: we implement full causal attention only.

    transformers takes `layer_types` when given; otherwise layers from `max_window_layers` on
    slide when `use_sliding_window` is set. The published checkpoint has neither.
    """
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
            raise CheckpointError(
                f"config field '{prefix}layer_types' must list only 'full_attention' "
                f"(sliding-window attention is not supported), got {layer_types!r}"
            )
    elif cfg.get("use_sliding_window") and cfg.get("max_window_layers", 28) < num_layers:
        raise CheckpointError(
            f"config field '{prefix}use_sliding_window' must be false: sliding-window attention "
            "is not supported"
        )
