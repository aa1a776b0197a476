"""Resolve "local directory or hub id" to files on disk, and read official safetensors checkpoints.

Loading by hub id is real code (`huggingface_hub.snapshot_download`), so a pre-filled cache works
with `HF_HUB_OFFLINE=1`. Errors name the path or id and what is missing, so a user who typed the
wrong directory learns it at load time rather than deep inside a forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from safetensors import safe_open

from core.errors import CheckpointError

if TYPE_CHECKING:  # torch only in annotations: the CLI checks paths here before importing it
    import torch

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
MODEL_TYPE = "moss_tts_realtime"
# The sections each loader cannot do without (core/model/config.py, core/codec/config.py).
MODEL_SECTIONS = ("language_config", "local_config")
CODEC_SECTIONS = ("encoder_kwargs", "decoder_kwargs", "quantizer_kwargs")

CheckpointKind = Literal["model", "codec"]


def local_dir_or_hub_id(name_or_path: str | Path) -> Path | str:
    """An existing directory as a `Path`, else the name as a hub id; raises if it is neither.

    No network and no torch: callers can reject a typo before anything slow starts.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{name!r} is a file; expected a checkpoint directory or a hub id")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name!r} is neither an existing directory nor a hub id (owner/name)")
    return name


def checkpoint_kind(config: dict[str, Any]) -> CheckpointKind | None:
    """Which checkpoint a `config.json` describes, judged by the sections its loader reads.

    Lets a caller say "you passed the codec where the model goes" instead of a missing-field
    error from the wrong parser.
    """
    model_type = config.get("model_type", MODEL_TYPE)  # absent: trust the sections
    if all(key in config for key in MODEL_SECTIONS) and model_type == MODEL_TYPE:
        return "model"
    if all(key in config for key in CODEC_SECTIONS):
        return "codec"
    return None


def resolve_pretrained(
    name_or_path: str | Path, *, allow_patterns: Iterable[str] | None = None
) -> Path:
    """Return a local directory for `name_or_path`: an existing directory, or a hub snapshot."""
    local = local_dir_or_hub_id(name_or_path)
    if isinstance(local, Path):
        return local
    name = local
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # The hub client's exceptions carry pages of context; a caller (the CLI, LiveKit's
    # download-files) needs one line: which repo, why, and what to do.
    try:
        return Path(
            snapshot_download(
                name, allow_patterns=list(allow_patterns) if allow_patterns else None
            )
        )
    except LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the hub did not answer"
        raise CheckpointError(
            f"{name!r} is not a local directory nor in the HF cache, and this machine is offline "
            f"({why}): it needs network access or a pre-filled HF cache; run `hf download {name}`"
        ) from exc
    except GatedRepoError as exc:
        raise CheckpointError(
            f"{name!r} is a gated repo: accept its terms on huggingface.co, then `hf auth login`"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise CheckpointError(
            f"{name!r} is not a local directory nor a hub repo you can read: check the id, or "
            f"`hf auth login` for a private one"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(
            f"{name!r} is not a local directory, and fetching it as a hub id failed: "
            f"{type(exc).__name__}: {first}"
        ) from exc


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, naming the file in the error when it is absent or malformed."""
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"malformed JSON in {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint: one `model.safetensors`, or the shards its index lists."""
    index = directory / _INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {missing}")
        return shards
    single = directory / _SINGLE
    if single.is_file():
        return [single]
    raise CheckpointError(f"no {_SINGLE} or {_INDEX} in {directory}")


def load_safetensors(directory: Path, *, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by its official name (memory-mapped), minus `skip`."""
    skipped = set(skip)
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(directory):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key in skipped:
                        continue
                    if key in tensors:
                        raise CheckpointError(f"tensor {key!r} appears in more than one shard")
                    tensors[key] = handle.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own types for truncated/corrupt files
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
    return tensors
