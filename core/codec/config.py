"""CodecConfig: the MOSS-Audio-Tokenizer stage chain, read from the official `config.json`.

The official file lists encoder/decoder stages as kwargs dicts; we turn them into small frozen
specs, check that widths chain and patch sizes multiply to the frame size, and compute each
transformer's attention window the way upstream does (`int(frame_rate * context_seconds)`), so a
checkpoint we cannot run faithfully is rejected at load time, not mid-stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from core.errors import CheckpointError


@dataclass(frozen=True)
class PatchSpec:
    """Reshape-only stage: `patch_size` samples <-> channels (no weights)."""

    patch_size: int


@dataclass(frozen=True)
class TransformerSpec:
    """One projected transformer stage (causal, RoPE, sliding window of `context` positions)."""

    input_dimension: int
    d_model: int
    output_dimension: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    layer_scale: float | None
    max_period: float
    context: int  # attention window in positions at this stage's rate
    rate: float  # positions per second at this stage

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


StageSpec = PatchSpec | TransformerSpec


@dataclass(frozen=True)
class QuantizerSpec:
    """Residual LFQ: `num_quantizers` codebooks of `codebook_size` x `codebook_dim`."""

    input_dim: int
    rvq_dim: int
    output_dim: int
    num_quantizers: int
    codebook_size: int
    codebook_dim: int


@dataclass(frozen=True)
class CodecConfig:
    """Everything needed to build the codec; `raw` keeps the official dict for save_pretrained."""

    sample_rate: int
    frame_samples: int  # official `downsample_rate`
    context_seconds: float
    encoder: tuple[StageSpec, ...]
    decoder: tuple[StageSpec, ...]
    quantizer: QuantizerSpec
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_samples

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> CodecConfig:
        """Parse the official config dict; raises CheckpointError naming the bad field."""
        if not isinstance(cfg, dict):
            raise CheckpointError(f"codec config must be a JSON object, got {type(cfg).__name__}")
        sample_rate = _int(cfg, "sampling_rate", cfg.get("sample_rate"))
        frame_samples = _int(cfg, "downsample_rate")
        context_seconds = _float(cfg, "causal_transformer_context_duration")
        if sample_rate <= 0 or frame_samples <= 0 or context_seconds <= 0:
            raise CheckpointError(
                "codec config: sampling_rate, downsample_rate and "
                "causal_transformer_context_duration must be positive"
            )
        quantizer = _parse_quantizer(cfg)
        rate = float(sample_rate)
        encoder: list[StageSpec] = []
        for i, kw in enumerate(_stage_list(cfg, "encoder_kwargs")):
            stage = _parse_stage(kw, f"encoder_kwargs[{i}]", rate, context_seconds)
            if isinstance(stage, PatchSpec):
                rate /= stage.patch_size
            encoder.append(stage)
        decoder: list[StageSpec] = []
        for i, kw in enumerate(_stage_list(cfg, "decoder_kwargs")):
            stage = _parse_stage(kw, f"decoder_kwargs[{i}]", rate, context_seconds)
            if isinstance(stage, PatchSpec):
                rate *= stage.patch_size
            decoder.append(stage)
        config = cls(
            sample_rate=sample_rate,
            frame_samples=frame_samples,
            context_seconds=context_seconds,
            encoder=tuple(encoder),
            decoder=tuple(decoder),
            quantizer=quantizer,
            raw=dict(cfg),
        )
        config._check_chain()
        return config

    def _check_chain(self) -> None:
        """Widths must chain stage to stage and patches must multiply to one frame."""
        for name, stages in (("encoder", self.encoder), ("decoder", self.decoder)):
            total = math.prod(s.patch_size for s in stages if isinstance(s, PatchSpec))
            if total != self.frame_samples:
                raise CheckpointError(
                    f"codec config: {name} patch sizes multiply to {total}, "
                    f"but downsample_rate is {self.frame_samples}"
                )
        width = 1
        for i, s in enumerate(self.encoder):
            width = _chain(width, s, f"encoder_kwargs[{i}]", down=True)
        if width != self.quantizer.input_dim:
            raise CheckpointError(
                f"codec config: encoder ends with width {width}, "
                f"quantizer input_dim is {self.quantizer.input_dim}"
            )
        width = self.quantizer.output_dim
        for i, s in enumerate(self.decoder):
            width = _chain(width, s, f"decoder_kwargs[{i}]", down=False)
        if width != 1:
            raise CheckpointError(f"codec config: decoder ends with {width} channels, expected 1")
        if not isinstance(self.decoder[-1], PatchSpec) or not isinstance(
            self.encoder[0], PatchSpec
        ):
            raise CheckpointError(
                "codec config: encoder must start and decoder end with a patch stage"
            )


def _chain(width: int, stage: StageSpec, where: str, *, down: bool) -> int:
    if isinstance(stage, PatchSpec):
        if down:
            return width * stage.patch_size
        if width % stage.patch_size:
            raise CheckpointError(
                f"codec config: {where}: {width} channels do not split into patches of "
                f"{stage.patch_size}"
            )
        return width // stage.patch_size
    if stage.input_dimension != width:
        raise CheckpointError(
            f"codec config: {where}: input_dimension {stage.input_dimension} "
            f"!= incoming width {width}"
        )
    return stage.output_dimension


def _parse_stage(kw: Any, where: str, rate: float, context_seconds: float) -> StageSpec:
    if not isinstance(kw, dict):
        raise CheckpointError(f"codec config: {where} must be an object")
    kind = kw.get("module_type")
    if kind == "PatchedPretransform":
        patch = _int(kw, "patch_size", where=where)
        if patch <= 0:
            raise CheckpointError(f"codec config: {where}.patch_size must be positive")
        return PatchSpec(patch)
    if kind != "Transformer":
        raise CheckpointError(f"codec config: {where}.module_type {kind!r} is not supported")
    unsupported = {
        "norm": ("layer_norm",),
        "gating": ("none",),
        "positional_embedding": ("rope",),
        "causal": (True,),
    }
    for key, allowed in unsupported.items():
        if kw.get(key, allowed[0]) not in allowed:
            raise CheckpointError(
                f"codec config: {where}.{key}={kw.get(key)!r} is not supported "
                f"(only {allowed[0]!r})"
            )
    d_model = _int(kw, "d_model", where=where)
    heads = _int(kw, "num_heads", where=where)
    if heads <= 0 or d_model % heads or (d_model // heads) % 2:
        raise CheckpointError(
            f"codec config: {where}: d_model {d_model} must split into {heads} heads of even size"
        )
    layer_scale = kw.get("layer_scale")
    if layer_scale is not None and not isinstance(layer_scale, int | float):
        raise CheckpointError(f"codec config: {where}.layer_scale must be a number or null")
    context = int(rate * context_seconds)  # upstream's exact rounding
    if context < 1:
        raise CheckpointError(f"codec config: {where}: attention window is {context} positions")
    return TransformerSpec(
        input_dimension=_int(kw, "input_dimension", d_model, where=where),
        d_model=d_model,
        output_dimension=_int(kw, "output_dimension", d_model, where=where),
        num_heads=heads,
        num_layers=_int(kw, "num_layers", where=where),
        dim_feedforward=_int(kw, "dim_feedforward", where=where),
        layer_scale=None if layer_scale is None else float(layer_scale),
        max_period=float(kw.get("max_period", 10000)),
        context=context,
        rate=rate,
    )


def _parse_quantizer(cfg: dict[str, Any]) -> QuantizerSpec:
    kw = cfg.get("quantizer_kwargs")
    if not isinstance(kw, dict):
        raise CheckpointError("codec config: missing 'quantizer_kwargs' object")
    qtype = kw.get("quantizer_type", cfg.get("quantizer_type", "rvq"))
    if qtype not in ("rlfq", "random_prefix_rlfq"):
        raise CheckpointError(
            f"codec config: quantizer_type {qtype!r} is not supported (rlfq only)"
        )
    where = "quantizer_kwargs"
    input_dim = _int(kw, "input_dim", where=where)
    spec = QuantizerSpec(
        input_dim=input_dim,
        rvq_dim=_int(kw, "rvq_dim", input_dim, where=where),
        output_dim=_int(kw, "output_dim", input_dim, where=where),
        num_quantizers=_int(kw, "num_quantizers", where=where),
        codebook_size=_int(kw, "codebook_size", where=where),
        codebook_dim=_int(kw, "codebook_dim", where=where),
    )
    if spec.rvq_dim == spec.codebook_dim:
        raise CheckpointError(
            "codec config: rvq_dim == codebook_dim (no LFQ projections) unsupported"
        )
    if min(spec.num_quantizers, spec.codebook_size, spec.codebook_dim) <= 0:
        raise CheckpointError("codec config: quantizer sizes must be positive")
    return spec


def _stage_list(cfg: dict[str, Any], key: str) -> list[Any]:
    stages = cfg.get(key)
    if not isinstance(stages, list) or not stages:
        raise CheckpointError(f"codec config: '{key}' must be a non-empty list")
    return stages


def _int(d: dict[str, Any], key: str, default: Any = None, *, where: str = "") -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        name = f"{where}.{key}" if where else key
        raise CheckpointError(f"codec config: {name} must be an integer, got {value!r}")
    return value


def _float(d: dict[str, Any], key: str) -> float:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CheckpointError(f"codec config: {key} must be a number, got {value!r}")
    return float(value)
