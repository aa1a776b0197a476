"""Per-slot streaming state (moshi style): dataclasses whose tensors have a leading slot dim.

A slot is one stream's seat in a fixed-size batch. State is allocated once by `init_*_state`,
reset per slot with `reset(slots)` and never reallocated in the hot loop, so the engine can serve
streams that start and stop at different times in one batched decode.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def slot_indices(slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Normalise a reset selector (Bool mask [S] or Long indices [N]) to Long indices."""
    if slots.dtype == torch.bool:
        assert slots.shape == (num_slots,), (
            f"reset mask must be [{num_slots}], got {tuple(slots.shape)}"
        )
        return slots.nonzero().flatten()
    assert slots.dim() == 1, f"slot indices must be 1-D, got {tuple(slots.shape)}"
    return slots.long()


@dataclass
class SlotState:
    """Base class: `reset` zeroes every tensor field's rows for the given slots and recurses."""

    def reset(self, slots: torch.Tensor) -> None:
        """Return the selected slots to their initial (empty, position 0) state."""
        for f in fields(self):
            value = getattr(self, f.name)
            items = value if isinstance(value, list | tuple) else [value]
            for item in items:
                if isinstance(item, torch.Tensor):
                    idx = slot_indices(slots, item.shape[0]).to(item.device)
                    item.index_fill_(0, idx, 0)
                elif isinstance(item, SlotState):
                    item.reset(slots)


@dataclass
class CodecDecodeState(SlotState):
    """Streaming decoder state of `num_slots` independent streams.

    `frames[s]` counts the code frames slot `s` has decoded since its last reset; every stage
    derives its positions (for RoPE and the attention window) from it. `stages` holds one state per
    decoder transformer stage (ring KV caches per layer).
    """

    frames: torch.Tensor  # Long[S]
    stages: list[SlotState]

    @property
    def num_slots(self) -> int:
        return int(self.frames.shape[0])
