"""Checkpoint loading: official layout in, precise CheckpointErrors for anything else.

A user pointing the engine at a truncated download, a foreign checkpoint or a hand-edited config
must learn which key or field is wrong at load time, not get a shape error deep in a forward.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import CheckpointError
from core.model import KVPool, ModelConfig, MossTTSRealtime, SamplerBatch, SamplingParams
from core.model.weights import DUPLICATE_TEXT_EMBED, official_shapes, official_to_ours
from core.tiny import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_weights")
    write_tiny_model(path, seed=3)
    return path


def _copy_with(tmp_path: Path, tiny: Path, edit) -> Path:
    """A copy of the tiny checkpoint whose tensors went through `edit(dict)`."""
    out = tmp_path / "ckpt"
    out.mkdir()
    shutil.copy(tiny / "config.json", out / "config.json")
    tensors = load_file(tiny / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


def _config_with(tmp_path: Path, tiny: Path, edit) -> Path:
    out = tmp_path / "ckpt"
    out.mkdir()
    shutil.copy(tiny / "model.safetensors", out / "model.safetensors")
    cfg = json.loads((tiny / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_conformance_checkpoint_loads_and_round_trips(tmp_path: Path, conformance_dir: Path):
    """Prevents failing on the real on-disk format (written by upstream's save_pretrained) and
    writing checkpoints upstream could not read back."""
    model = MossTTSRealtime.from_pretrained(conformance_dir / "model")
    assert model.dtype == torch.bfloat16 and model.config.text_pad_id == 426
    assert model.config.audio_pad_text_id == 425 and model.config.text_vocab_size == 448
    model.save_pretrained(tmp_path / "out")
    original = load_file(conformance_dir / "model" / "model.safetensors")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert set(written) == set(original) and len(written) == 95
    for key, value in original.items():
        assert torch.equal(written[key], value), key
    again = MossTTSRealtime.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(again.text_embed, model.text_embed.float())


def test_missing_key_is_named(tmp_path: Path, tiny: Path):
    """Prevents a truncated checkpoint from loading with silently random weights."""
    path = _copy_with(tmp_path, tiny, lambda t: t.pop("language_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing keys \[language_model\.layers\.1\.mlp\.up_proj"
    ):
        MossTTSRealtime.from_pretrained(path)


def test_unexpected_key_is_named(tmp_path: Path, tiny: Path):
    """Prevents loading a checkpoint of a different architecture that happens to share names."""

    def add(t):
        t["lm_head.weight"] = torch.zeros(4, 4)

    with pytest.raises(CheckpointError, match=r"unexpected keys \[lm_head\.weight\]"):
        MossTTSRealtime.from_pretrained(_copy_with(tmp_path, tiny, add))


def test_wrong_shape_is_named(tmp_path: Path, tiny: Path):
    """Prevents a config/weights mismatch from surfacing as an obscure matmul error later."""

    def shrink(t):
        t["local_transformer.local_lm_heads.3.weight"] = torch.zeros(1000, 64, dtype=torch.bfloat16)

    with pytest.raises(
        CheckpointError, match=r"local_lm_heads\.3\.weight: checkpoint \(1000, 64\)"
    ):
        MossTTSRealtime.from_pretrained(_copy_with(tmp_path, tiny, shrink))


def test_duplicate_text_table_is_optional(tmp_path: Path, tiny: Path):
    """Prevents rejecting checkpoints saved without upstream's dead duplicate embedding."""
    path = _copy_with(tmp_path, tiny, lambda t: t.pop(DUPLICATE_TEXT_EMBED))
    assert MossTTSRealtime.from_pretrained(path).config.hidden_size == 64


def _sliding_from_layer_1(cfg: dict) -> None:
    """Qwen3's older spelling of sliding-window layers (no `layer_types`)."""
    del cfg["language_config"]["layer_types"]
    cfg["language_config"].update(use_sliding_window=True, max_window_layers=1)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c["language_config"].pop("hidden_size"), "language_config.hidden_size"),
        (
            lambda c: c["local_config"].update(num_key_value_heads="2"),
            "local_config.num_key_value_heads",
        ),
        (lambda c: c.pop("text_pad"), "text_pad"),
        (lambda c: c.update(reference_audio_pad=100000), "reference_audio_pad"),
        (lambda c: c.pop("local_config"), "local_config"),
        (lambda c: c["language_config"].pop("rope_theta"), "language_config.rope_theta"),
        (lambda c: c["language_config"].update(rope_scaling={"rope_type": "yarn"}), "rope type"),
        (
            lambda c: c["language_config"].update(layer_types=["full_attention", "sliding"]),
            "language_config.layer_types",
        ),
        (_sliding_from_layer_1, "language_config.use_sliding_window"),
    ],
)
def test_malformed_config_names_the_field(tmp_path: Path, tiny: Path, edit, field: str):
    """Prevents a hand-edited or foreign config.json from failing with a bare KeyError/TypeError."""
    with pytest.raises(CheckpointError, match=field.replace(".", r"\.")):
        MossTTSRealtime.from_pretrained(_config_with(tmp_path, tiny, edit))


def test_invalid_json_and_missing_weights(tmp_path: Path, tiny: Path):
    """Prevents a half-downloaded directory from raising a raw JSON/IO error."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed JSON"):
        MossTTSRealtime.from_pretrained(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        MossTTSRealtime.from_pretrained(empty)


def test_both_rope_config_forms(tiny: Path):
    """Prevents rejecting configs written by transformers 5 (`rope_parameters`) or by older
    versions (`rope_theta` + `rope_scaling`), which the published checkpoints may use."""
    cfg = json.loads((tiny / "config.json").read_text())
    legacy = ModelConfig.from_dict(cfg)
    lang = cfg["language_config"]
    lang["rope_parameters"] = {"rope_type": "default", "rope_theta": lang.pop("rope_theta")}
    lang.pop("rope_scaling")
    local = cfg["local_config"]
    for key in ("rope_theta", "rope_type"):
        local.pop(key)
    modern = ModelConfig.from_dict(cfg)
    assert modern.backbone == legacy.backbone and modern.local == legacy.local
    assert legacy.backbone.rope_theta == 1e6 and legacy.local.rope_factor == 1.0
    cfg["language_config"]["rope_parameters"] = {
        "rope_type": "linear",
        "rope_theta": 1e4,
        "factor": 2.0,
    }
    scaled = ModelConfig.from_dict(cfg).backbone
    assert (scaled.rope_theta, scaled.rope_factor) == (1e4, 2.0)


def test_config_defaults_follow_upstream(tiny: Path):
    """Prevents building a different network than upstream from a config that leaves fields out:
    a missing head_dim is Qwen3Config's 128 (not hidden // heads), and a sliding-window flag that
    transformers would ignore (`max_window_layers` covers every layer) is accepted."""
    cfg = json.loads((tiny / "config.json").read_text())
    for section in ("language_config", "local_config"):
        cfg[section].pop("head_dim")
    cfg["language_config"].pop("layer_types")
    cfg["language_config"].update(use_sliding_window=True, max_window_layers=2)
    config = ModelConfig.from_dict(cfg)
    assert config.backbone.head_dim == config.local.head_dim == 128
    assert config.backbone.hidden_size // config.backbone.num_heads == 16  # the other reading


def test_published_dimensions_map_the_published_inventory(tiny: Path):
    """Prevents a loader that works on tiny dims but not on the published checkpoint: with the
    real config values (Qwen3-1.7B backbone, 4-layer local, vocab 151936) our name map covers the
    403 published tensors (2,331,940,864 stored params incl. the duplicate text table) and loads
    strictly. Runs on the meta device: no memory is allocated."""
    cfg = json.loads((tiny / "config.json").read_text())
    dims = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    dims["intermediate_size"] = 6144
    cfg["language_config"].update(dims, num_hidden_layers=28, vocab_size=151936)
    cfg["language_config"]["layer_types"] = ["full_attention"] * 28
    cfg["local_config"].update(dims, num_hidden_layers=4)
    cfg.update(text_pad=151655, reference_audio_pad=151654)
    config = ModelConfig.from_dict(cfg)
    assert (config.backbone.rope_theta, config.local.rope_theta) == (1e6, 1e6)
    shapes = official_shapes(config)
    shapes[DUPLICATE_TEXT_EMBED] = shapes["embed_tokens.0.weight"]
    assert len(shapes) == 403
    assert sum(torch.Size(shape).numel() for shape in shapes.values()) == 2_331_940_864
    tensors = {k: torch.empty(v, dtype=torch.bfloat16, device="meta") for k, v in shapes.items()}
    state = official_to_ours(tensors, config, dtype=torch.bfloat16, device="meta")
    with torch.device("meta"):
        model = MossTTSRealtime(config)
    model.load_state_dict(state, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == 2_020_775_936  # without the duplicate


def test_sharded_checkpoint_loads(tmp_path: Path, tiny: Path):
    """Prevents failing on the sharded layout (`model.safetensors.index.json`) of big models."""
    tensors = load_file(tiny / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(tiny / "config.json", out / "config.json")
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, out / file)
        weight_map.update(dict.fromkeys(keys, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = MossTTSRealtime.from_pretrained(out)
    single = MossTTSRealtime.from_pretrained(tiny)
    for (name, a), b in zip(
        sharded.state_dict().items(), single.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_hub_id_from_prefilled_cache_offline(tmp_path: Path, tiny: Path, monkeypatch):
    """Prevents offline deployments (HF_HUB_OFFLINE=1, weights pre-downloaded) from failing
    or trying the network; an id that is not cached gives a CheckpointError naming it."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--acme--tiny-moss" / "snapshots" / commit
    shutil.copytree(tiny, snapshot)
    (cache / "models--acme--tiny-moss" / "refs").mkdir()
    (cache / "models--acme--tiny-moss" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    model = MossTTSRealtime.from_pretrained("acme/tiny-moss", dtype=torch.float32)
    assert model.config.hidden_size == 64
    with pytest.raises(CheckpointError, match=r"'acme/not-there' is not a local dir.*offline"):
        MossTTSRealtime.from_pretrained("acme/not-there")
    with pytest.raises(CheckpointError, match="neither an existing directory nor a hub id"):
        MossTTSRealtime.from_pretrained(tmp_path / "no" / "such" / "dir")


@torch.inference_mode()
def test_dtypes(tiny: Path):
    """Prevents silently loading in a dtype the engine did not ask for (memory and speed), and a
    half-precision model (bf16 is the deployment default) that loads but mixes dtypes in its
    forward, KV cache or sampler: each dtype runs a prefill, a step and a frame close to fp32."""
    rows = torch.randint(0, 1024, (9, 17), generator=torch.Generator().manual_seed(0))
    rows[:, 0] %= 448
    hidden = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = MossTTSRealtime.from_pretrained(tiny, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        kv = KVPool(model.config, num_blocks=4, block_size=8, dtype=dtype)
        seq = kv.new_sequence()
        model.forward_rows([rows[:8]], [seq], kv)
        hidden[dtype] = model.forward_rows([rows[8:]], [seq], kv)
        assert hidden[dtype].dtype == dtype and hidden[dtype].shape == (1, 64)
        sampler = SamplerBatch.from_params([SamplingParams(seed=0)])
        codes = model.sample_frame(hidden[dtype], sampler)
        assert codes.shape == (1, 16) and bool(((codes >= 0) & (codes < 1027)).all())
    for dtype in (torch.bfloat16, torch.float16):
        err = (hidden[dtype].float() - hidden[torch.float32]).abs().max().item()
        assert err < 0.1, (dtype, err)
    with pytest.raises(ValueError, match="dtype"):
        MossTTSRealtime.from_pretrained(tiny, dtype=torch.int8)


def test_conformance_files_are_the_upstream_written_ones():
    """Prevents a fixture edited by hand (or re-saved by our own code) from passing for upstream's:
    every upstream-written file must still hash as recorded when upstream wrote it."""
    pack = Path(__file__).resolve().parents[1] / "fixtures" / "conformance"
    recorded = {}
    for line in (pack / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        recorded[name] = digest
    assert len(recorded) == 7 and "model/model.safetensors" in recorded
    for name, digest in recorded.items():
        assert hashlib.sha256((pack / name).read_bytes()).hexdigest() == digest, name
