"""MossAudioCodec: MOSS-Audio-Tokenizer encode, whole-clip decode and batched streaming decode.

Weights load from the official layout (local dir or hub id, one file or shards). `decode_step`
serves many streams at once: each slot of a `CodecDecodeState` has its own position and ring KV
caches, slots are reset by index, nothing is reallocated per step, and there is no lookahead: one
code frame in, its 1920 samples out, equal to the whole-clip windowed `decode` at every length.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from core.codec.config import CodecConfig, PatchSpec, TransformerSpec
from core.codec.layers import ProjectedTransformer, patch_down, patch_up
from core.codec.quantizer import ResidualLFQ, official_quantizer_keys
from core.codec.streaming import CodecDecodeState, SlotState
from core.device import COMPUTE_DTYPES
from core.errors import CheckpointError
from core.hub import load_safetensors, read_json, resolve_pretrained

_MAX_LISTED = 8


def _stages(specs: tuple) -> nn.ModuleList:
    """Patch stages hold no weights; an Identity keeps the official module indices."""
    return nn.ModuleList(
        ProjectedTransformer(s) if isinstance(s, TransformerSpec) else nn.Identity() for s in specs
    )


class MossAudioCodec(nn.Module):
    """24 kHz mono <-> 12.5 Hz codes (16 of 32 residual LFQ codebooks used by the TTS model)."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.sample_rate = config.sample_rate
        self.frame_samples = config.frame_samples
        self.num_quantizers = config.quantizer.num_quantizers
        self.codebook_size = config.quantizer.codebook_size
        self.encoder = _stages(config.encoder)
        self.quantizer = ResidualLFQ(config.quantizer)
        self.decoder = _stages(config.decoder)
        # Positions per code frame of each decoder stage (1 at 12.5 Hz, then x patch size).
        self._per_call: list[int] = []
        rate = 1
        for spec in config.decoder:
            self._per_call.append(rate)
            if isinstance(spec, PatchSpec):
                rate *= spec.patch_size

    # ---------------------------------------------------------------- loading / saving
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> MossAudioCodec:
        """Load an official checkpoint; missing/unexpected/misshapen tensors: CheckpointError.

        `dtype` applies to the encoder/decoder transformers; the quantizer stays float32.
        """
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of float32/bfloat16/float16, got {dtype}")
        directory = resolve_pretrained(name_or_path, allow_patterns=["*.json", "*.safetensors"])
        config = CodecConfig.from_dict(read_json(directory / "config.json"))
        with torch.device("meta"):
            codec = cls(config)
        codec.load_official_state(load_safetensors(directory))
        codec.encoder.to(device=device, dtype=dtype)
        codec.decoder.to(device=device, dtype=dtype)
        codec.quantizer.to(device=device)
        return codec.requires_grad_(False).eval()

    def _network_params(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.named_parameters() if not k.startswith("quantizer.")}

    def official_keys(self) -> set[str]:
        """The tensor names an official checkpoint of this config holds."""
        keys = set(self._network_params())
        return keys | {f"quantizer.{k}" for k in official_quantizer_keys(self.config.quantizer)}

    def load_official_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Strictly load official tensors (fusing the quantizer's weight norms)."""
        expected = self.official_keys()
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise CheckpointError(
                "codec checkpoint does not match its config: "
                f"{len(missing)} missing {missing[:_MAX_LISTED]}, "
                f"{len(unexpected)} unexpected {unexpected[:_MAX_LISTED]}"
            )
        params = self._network_params()
        for name, param in params.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise CheckpointError(
                    f"codec tensor {name} has shape {tuple(tensors[name].shape)}, "
                    f"expected {tuple(param.shape)}"
                )
        state = {name: tensors[name].float() for name in params}
        self.load_state_dict(state, strict=False, assign=True)
        self.quantizer.to_empty(device="cpu")
        self.quantizer.load_official(
            {
                k.removeprefix("quantizer."): t
                for k, t in tensors.items()
                if k.startswith("quantizer.")
            }
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors in the official layout (fp32, like upstream)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: p.detach().float().cpu().contiguous() for k, p in self._network_params().items()
        }
        tensors |= {f"quantizer.{k}": t for k, t in self.quantizer.official_state().items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(self.config.raw, indent=2) + "\n")

    # ---------------------------------------------------------------- whole clip
    @property
    def _device(self) -> torch.device:
        return self.quantizer.table.device

    @staticmethod
    def _dtype_of(stages: nn.ModuleList) -> torch.dtype:
        return next(stages.parameters()).dtype

    @torch.no_grad()
    def encode(self, wave: torch.Tensor, n_quantizers: int = 16) -> torch.Tensor:
        """Float[T] at 24 kHz -> Long[T // 1920, nq] on the codec's device.

        A trailing partial frame is dropped (upstream zero-pads it into a frame whose codes do not
        depend on the audio); the codec is causal, so earlier frames are unaffected.
        """
        if wave.dim() != 1:
            raise ValueError(f"encode expects a 1-D waveform, got shape {tuple(wave.shape)}")
        if not 0 <= n_quantizers <= self.num_quantizers:
            raise ValueError(
                f"n_quantizers must be in [0, {self.num_quantizers}], got {n_quantizers}"
            )
        frames = wave.shape[0] // self.frame_samples
        x = wave[: frames * self.frame_samples].to(self._device, self._dtype_of(self.encoder))
        x = x.view(1, -1, 1)
        if frames == 0:
            return torch.zeros(0, n_quantizers, dtype=torch.long, device=self._device)
        for spec, stage in zip(self.config.encoder, self.encoder, strict=True):
            x = patch_down(x, spec.patch_size) if isinstance(spec, PatchSpec) else stage(x)
        return self.quantizer.encode(x[0], n_quantizers)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Long[T, nq] -> Float[T * 1920]: whole-clip windowed decode from position 0."""
        self._check_codes(codes)
        x = (
            self.quantizer.decode(codes.to(self._device))
            .to(self._dtype_of(self.decoder))
            .unsqueeze(0)
        )
        for spec, stage in zip(self.config.decoder, self.decoder, strict=True):
            x = patch_up(x, spec.patch_size) if isinstance(spec, PatchSpec) else stage(x)
        return x.reshape(-1).float()

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 2 or not 1 <= codes.shape[1] <= self.num_quantizers:
            raise ValueError(
                f"codes must be [T, nq<={self.num_quantizers}], got {tuple(codes.shape)}"
            )
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be integer, got {codes.dtype}")
        # Range only for CPU codes: on a GPU the read would sync, and the engine never passes
        # the model's special codes (pad/BOS/EOS >= codebook_size) to the codec.
        if codes.device.type == "cpu" and codes.numel():
            low, high = int(codes.min()), int(codes.max())
            if low < 0 or high >= self.codebook_size:
                raise ValueError(
                    f"codes must be in [0, {self.codebook_size}), got [{low}, {high}] "
                    "(special codes such as pad/BOS/EOS are not audio)"
                )

    # ---------------------------------------------------------------- streaming
    def init_decode_state(self, num_slots: int) -> CodecDecodeState:
        """Empty state for `num_slots` streams (all at position 0); allocate once, reuse."""
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        stages = [
            stage.init_state(num_slots, per_call)
            for stage, per_call in zip(self.decoder, self._per_call, strict=True)
            if isinstance(stage, ProjectedTransformer)
        ]
        frames = torch.zeros(num_slots, dtype=torch.long, device=self._device)
        return CodecDecodeState(frames=frames, stages=stages)

    @torch.no_grad()
    def decode_step(
        self, codes: torch.Tensor, slots: torch.Tensor, state: CodecDecodeState
    ) -> torch.Tensor:
        """One code frame for each of N slots: codes Long[N, nq], slots Long[N] -> Float[N, 1920].

        Slots not listed do not advance. `slots` must be distinct; when it is a CPU tensor this is
        checked, and consecutive slots skip the KV gather.
        """
        slots, contiguous = self.check_step(codes, slots, state)
        wave = self.decode_rows(codes, slots, state.frames.index_select(0, slots), state.stages,
                                contiguous)
        state.frames.index_add_(0, slots, torch.ones_like(slots))
        return wave

    def check_step(
        self, codes: torch.Tensor, slots: torch.Tensor, state: CodecDecodeState
    ) -> tuple[torch.Tensor, slice | None]:
        """`decode_step`'s checks: ValueError for bad codes or slots; returns the slots on the
        codec's device and, when they are consecutive CPU ids, as a slice."""
        self._check_codes(codes)
        n = codes.shape[0]
        if slots.shape != (n,):
            raise ValueError(f"slots must be [{n}], got {tuple(slots.shape)}")
        contiguous = self._contiguous(slots, state.num_slots)
        return slots.to(self._device, torch.long), contiguous

    def decode_rows(
        self, codes: torch.Tensor, slots: torch.Tensor, frames: torch.Tensor,
        stages: list[SlotState], contiguous: slice | None = None,
    ) -> torch.Tensor:
        """The body of `decode_step` without its checks and without advancing `frames`, so it
        can be traced (`core.codec.compiled`): codes Long[N, nq] of slots Long[N] (device) at
        frame positions Long[N] -> Float[N, 1920]; writes the slots' rings in `stages`."""
        n = codes.shape[0]
        x = (
            self.quantizer.decode(codes.to(self._device))
            .to(self._dtype_of(self.decoder))
            .unsqueeze(1)
        )
        stage_states = iter(stages)
        for spec, stage, per_call in zip(
            self.config.decoder, self.decoder, self._per_call, strict=True
        ):
            if isinstance(spec, PatchSpec):
                x = patch_up(x, spec.patch_size)
            else:
                x = stage.step(x, frames * per_call, slots, contiguous, next(stage_states))
        return x.reshape(n, self.frame_samples).float()

    @staticmethod
    def _contiguous(slots: torch.Tensor, num_slots: int) -> slice | None:
        """Validate CPU slot ids; return them as a slice when consecutive (no KV gather needed)."""
        if slots.device.type != "cpu":
            return None
        ids = slots.tolist()
        if len(set(ids)) != len(ids) or (ids and not 0 <= min(ids) <= max(ids) < num_slots):
            raise ValueError(f"slots must be distinct ids in [0, {num_slots}), got {ids}")
        if ids and ids == list(range(ids[0], ids[0] + len(ids))):
            return slice(ids[0], ids[0] + len(ids))
        return None

    def extra_repr(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        return f"params={params / 1e6:.1f}M, frame_rate={self.config.frame_rate:g} Hz"
