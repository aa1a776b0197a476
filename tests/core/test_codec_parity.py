"""Codec parity with the upstream code on the conformance pack (checkpoints written by upstream)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.codec import CodecConfig, MossAudioCodec
from core.errors import CheckpointError

INPUTS = ("wav_prompt", "wav_user1", "wav_user2")
AUDIO_TOL = 1e-4


@pytest.fixture(scope="module")
def ref(conformance_dir: Path) -> dict[str, np.ndarray]:
    with np.load(conformance_dir / "ref_outputs.npz") as data:
        return {k: data[k] for k in data.files if not k.startswith("tts/")}


@pytest.fixture(scope="module", params=["codec", "codec_ctx064"])
def pack_codec(request: pytest.FixtureRequest, conformance_dir: Path) -> tuple[str, MossAudioCodec]:
    return request.param, MossAudioCodec.from_pretrained(conformance_dir / request.param)


def _frames(codes: np.ndarray) -> torch.Tensor:
    """Upstream [nq, T] -> ours [T, nq]."""
    return torch.from_numpy(codes).T.contiguous()


def test_window_sizes_follow_upstream_rounding(pack_codec: tuple[str, MossAudioCodec]) -> None:
    """Wrong window sizes would change every sample after the first seconds."""
    name, codec = pack_codec
    windows = [s.context for s in codec.config.decoder if hasattr(s, "context")]
    assert windows == ([125, 250, 500, 1000] if name == "codec" else [8, 16, 32, 64])


@pytest.mark.parametrize("wav", INPUTS)
def test_encode_codes_match_upstream(
    pack_codec: tuple[str, MossAudioCodec], ref: dict[str, np.ndarray], wav: str
) -> None:
    """Voice prompts encode to the codes the model was trained on (full frames; partial dropped)."""
    name, codec = pack_codec
    audio = torch.from_numpy(ref[f"inputs/{wav}"])
    codes = codec.encode(audio, n_quantizers=32)
    frames = audio.shape[0] // 1920
    assert codes.shape == (frames, 32) and codes.dtype == torch.long
    expected = ref[f"{name}/{wav}/codes32"][:, :frames].T
    decisive = ref[f"{name}/{wav}/lfq_margin"][:, :frames].T >= 1e-4
    assert decisive.mean() > 0.9
    np.testing.assert_array_equal(codes.numpy()[decisive], expected[decisive])
    np.testing.assert_array_equal(
        codec.encode(audio, n_quantizers=16).numpy(), codes[:, :16].numpy()
    )


@pytest.mark.parametrize("wav", INPUTS)
def test_whole_clip_decode_matches_upstream(
    pack_codec: tuple[str, MossAudioCodec], ref: dict[str, np.ndarray], wav: str
) -> None:
    """Decoded audio equals upstream's for the 16 codebooks the TTS model produces."""
    name, codec = pack_codec
    codes = _frames(ref[f"{name}/{wav}/codes32"][:16])
    np.testing.assert_allclose(
        codec.decode(codes).numpy(), ref[f"{name}/{wav}/roundtrip16_wav"], atol=AUDIO_TOL, rtol=0
    )


def _stream(codec: MossAudioCodec, codes: torch.Tensor) -> np.ndarray:
    state = codec.init_decode_state(1)
    slot = torch.tensor([0])
    return torch.cat(
        [codec.decode_step(codes[i : i + 1], slot, state)[0] for i in range(codes.shape[0])]
    ).numpy()


def test_streaming_matches_upstream_within_window(
    ref: dict[str, np.ndarray], conformance_dir: Path
) -> None:
    """With 10 s windows (longer than the clip) upstream streaming is right: we must agree."""
    codec = MossAudioCodec.from_pretrained(conformance_dir / "codec")
    codes = _frames(ref["codec/rand_codes"])
    ours = _stream(codec, codes)
    for key in ("rand_decode_offline", "rand_decode_stream1", "rand_decode_stream3"):
        np.testing.assert_allclose(ours, ref[f"codec/{key}"], atol=AUDIO_TOL, rtol=0)
    np.testing.assert_allclose(
        codec.decode(codes).numpy(), ref["codec/rand_decode_offline"], atol=AUDIO_TOL, rtol=0
    )


def test_streaming_equals_offline_past_the_window(
    ref: dict[str, np.ndarray], conformance_dir: Path
) -> None:
    """Upstream streaming drifts after one window (its ring caches hold exactly one window, so a
    call feeding several positions loses keys); ours stays on the offline result."""
    codec = MossAudioCodec.from_pretrained(conformance_dir / "codec_ctx064")
    codes = _frames(ref["codec_ctx064/rand_codes"])
    offline = ref["codec_ctx064/rand_decode_offline"]
    np.testing.assert_allclose(_stream(codec, codes), offline, atol=AUDIO_TOL, rtol=0)
    np.testing.assert_allclose(codec.decode(codes).numpy(), offline, atol=AUDIO_TOL, rtol=0)
    # The fixture really crosses the window: upstream's own streaming departs from offline.
    assert np.abs(ref["codec_ctx064/rand_decode_stream1"] - offline).max() > 1e-2


def test_save_pretrained_round_trips_official_layout(tmp_path: Path, conformance_dir: Path) -> None:
    """Saved checkpoints keep the official names/shapes (upstream can load them), same audio."""
    codec = MossAudioCodec.from_pretrained(conformance_dir / "codec_ctx064")
    codec.save_pretrained(tmp_path)
    original = load_file(str(conformance_dir / "codec_ctx064" / "model.safetensors"))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        k: tuple(v.shape) for k, v in original.items()
    }
    reloaded = MossAudioCodec.from_pretrained(tmp_path)
    codes = torch.randint(0, 1024, (12, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reloaded.decode(codes), codec.decode(codes), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "config.json").read_text())["decoder_kwargs"]


def test_missing_and_unexpected_keys_are_named(tmp_path: Path, conformance_dir: Path) -> None:
    """A truncated or foreign checkpoint says which tensors are wrong, not a shape error later."""
    shutil.copy(conformance_dir / "codec" / "config.json", tmp_path / "config.json")
    tensors = load_file(str(conformance_dir / "codec" / "model.safetensors"))
    tensors.pop("decoder.2.transformer.layers.1.linear1.weight")
    tensors["decoder.9.bogus.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"decoder\.2\.transformer\.layers\.1\.linear1"
    ) as err:
        MossAudioCodec.from_pretrained(tmp_path)
    assert "decoder.9.bogus.weight" in str(err.value)


def test_wrong_shape_is_named(tmp_path: Path, conformance_dir: Path) -> None:
    """A checkpoint of a different size fails at load, naming the tensor."""
    shutil.copy(conformance_dir / "codec" / "config.json", tmp_path / "config.json")
    tensors = load_file(str(conformance_dir / "codec" / "model.safetensors"))
    tensors["encoder.3.output_proj.weight"] = torch.zeros(17, 32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.3\.output_proj\.weight"):
        MossAudioCodec.from_pretrained(tmp_path)


def test_sharded_checkpoint_loads(tmp_path: Path, conformance_dir: Path) -> None:
    """The real codec ships as two shards with an index; both layouts must load."""
    shutil.copy(conformance_dir / "codec" / "config.json", tmp_path / "config.json")
    tensors = load_file(str(conformance_dir / "codec" / "model.safetensors"))
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = MossAudioCodec.from_pretrained(tmp_path)
    single = MossAudioCodec.from_pretrained(conformance_dir / "codec")
    codes = torch.randint(0, 1024, (4, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(sharded.decode(codes), single.decode(codes))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("decoder_kwargs"), "decoder_kwargs"),
        (lambda c: c.update(downsample_rate=960), "patch sizes multiply"),
        (lambda c: c["decoder_kwargs"][2].update(input_dimension=25), "input_dimension"),
        (lambda c: c["quantizer_kwargs"].update(quantizer_type="fsq"), "quantizer_type"),
        (lambda c: c["encoder_kwargs"][1].update(norm="rms_norm"), "norm"),
        (lambda c: c["encoder_kwargs"][1].update(num_heads=5), "heads"),
        (lambda c: c.update(causal_transformer_context_duration="10"), "context_duration"),
    ],
)
def test_malformed_config_raises_checkpoint_error(
    edit, message: str, conformance_dir: Path
) -> None:
    """A config we cannot run faithfully is rejected at load with the offending field named."""
    config = json.loads((conformance_dir / "codec" / "config.json").read_text())
    edit(config)
    with pytest.raises(CheckpointError, match=message):
        CodecConfig.from_dict(config)
