"""MossTTSRealtime: 17-channel row embeddings -> Qwen3 backbone -> depth transformer -> codes.

Loading builds the module on the meta device and assigns the converted checkpoint tensors
(`assign=True`), so the weights are materialised once, directly in the requested dtype/device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from core.device import COMPUTE_DTYPES
from core.errors import CheckpointError
from core.hub import load_safetensors, read_json, resolve_pretrained
from core.model.backbone import Backbone
from core.model.config import ModelConfig
from core.model.depth import Depth
from core.model.kv_cache import KVPool
from core.model.sampling import SamplerBatch
from core.model.weights import DUPLICATE_TEXT_EMBED, official_to_ours, ours_to_official


class MossTTSRealtime(nn.Module):
    """The TTS network; knows nothing about streams, only rows in and codes out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.text_embed = nn.Parameter(torch.empty(config.text_vocab_size, d))
        self.audio_embed = nn.Parameter(torch.empty(config.rvq, config.audio_vocab_size, d))
        self.backbone = Backbone(config.backbone)
        self.depth = Depth(config)

    @property
    def device(self) -> torch.device:
        return self.text_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_embed.dtype

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ) -> MossTTSRealtime:
        """Load a local checkpoint directory or a hub id (honours HF_HUB_OFFLINE=1)."""
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of float32/bfloat16/float16, got {dtype}")
        # Weights, config and every tokenizer file (tokenizer.json, vocab.json, merges.txt, ...),
        # so `load_tokenizer` works on the same snapshot.
        directory = resolve_pretrained(
            name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt"]
        )
        config = ModelConfig.from_dict(read_json(directory / "config.json"))
        tensors = load_safetensors(directory, skip=(DUPLICATE_TEXT_EMBED,))
        state = official_to_ours(tensors, config, dtype=dtype, device=device)
        with torch.device("meta"):
            model = cls(config)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:  # a bug in the name map, not in the checkpoint
            raise CheckpointError(f"internal weight map mismatch: {exc}") from exc
        return model.eval().requires_grad_(False)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors with the official names (duplicate included)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        cfg["dtype"] = str(self.dtype).removeprefix("torch.")
        (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        save_file(
            ours_to_official(self.state_dict(), self.config),
            str(directory / "model.safetensors"),
            metadata={"format": "pt"},
        )

    def embed_rows(self, rows: Tensor) -> Tensor:
        """rows Long[..., 17] -> [..., D]: text embedding + the 16 codebook embeddings, in order."""
        cfg = self.config
        if rows.shape[-1] != cfg.row_width:
            raise ValueError(f"rows must have {cfg.row_width} columns, got {tuple(rows.shape)}")
        rows = rows.to(self.device)
        x = nn.functional.embedding(rows[..., 0], self.text_embed)
        for j in range(cfg.rvq):  # sequential sum, same order and rounding as upstream
            x = x + nn.functional.embedding(rows[..., j + 1], self.audio_embed[j])
        return x

    @torch.inference_mode()
    def forward_rows(
        self, rows: list[Tensor], seq_ids: list[int], kv: KVPool, *, all_rows: bool = False
    ) -> Tensor:
        """Append each sequence's new rows to its KV and return the final-normed backbone hidden
        of each sequence's last new row [B, D] (every row, packed [N, D], when `all_rows`).

        Prefill chunks and 1-row decode steps can share one call (varlen batch).
        """
        if len(rows) != len(seq_ids) or not rows:
            raise ValueError(f"need one row block per sequence, got {len(rows)} for {len(seq_ids)}")
        for r in rows:
            self._check_shape(r)
        # Concatenate where the rows are (normally the CPU), so a batch costs one host-to-device
        # copy in `embed_rows`, not one per sequence, and one id range check.
        packed = torch.cat([r.to(rows[0].device) for r in rows]) if len(rows) > 1 else rows[0]
        self._check_ids(packed)
        ctx = kv.plan(seq_ids, [r.shape[0] for r in rows])
        x = self.embed_rows(packed)
        return self.backbone(x, ctx, all_rows=all_rows)

    def _check_shape(self, rows: Tensor) -> None:
        cfg = self.config
        if rows.dim() != 2 or rows.shape[1] != cfg.row_width or rows.shape[0] == 0:
            raise ValueError(
                f"rows must be non-empty Long[T, {cfg.row_width}], got {tuple(rows.shape)}"
            )
        if rows.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"rows must hold integer ids, got {rows.dtype}")

    def _check_ids(self, rows: Tensor) -> None:
        """Id ranges when the rows are on the CPU (no device sync on the hot path)."""
        cfg = self.config
        if rows.device.type == "cpu" and rows.numel():
            text, codes = rows[:, 0], rows[:, 1:]
            if text.min() < 0 or text.max() >= cfg.text_vocab_size:
                raise ValueError(
                    f"text ids must be in [0, {cfg.text_vocab_size}), got "
                    f"[{int(text.min())}, {int(text.max())}]"
                )
            if codes.min() < 0 or codes.max() >= cfg.audio_vocab_size:
                raise ValueError(
                    f"audio codes must be in [0, {cfg.audio_vocab_size}), got "
                    f"[{int(codes.min())}, {int(codes.max())}]"
                )

    @torch.inference_mode()
    def sample_frame(
        self,
        hidden: Tensor,
        sampler: SamplerBatch,
        *,
        slots: Tensor | None = None,
        logits_out: Tensor | None = None,
    ) -> Tensor:
        """hidden [B, D] -> codes Long[B, 16] (16 depth steps, batched on-device sampling).

        `slots` (Long[B]) picks the sampler rows serving the hidden rows (default: all, in order);
        the sampler's repetition history and random counters of those rows advance by one frame.
        """
        idx = sampler.rows(slots, hidden.shape[0])
        hidden = hidden.to(self.dtype)
        logits_dtype = torch.promote_types(self.dtype, torch.float32)
        frame = sampler.prepare(idx, self.config.audio_vocab_size, logits_dtype)
        codes = self.depth(
            hidden, lambda logits, cb: sampler.draw(logits, cb, frame), logits_out=logits_out
        )
        sampler.commit(codes, idx)
        return codes
