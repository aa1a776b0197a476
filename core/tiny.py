"""Tiny random checkpoints in the official on-disk layout, for tests, CI and offline demos.

`python -m core.tiny OUTDIR` writes `OUTDIR/model` (config.json, model.safetensors, tokenizer files)
and `OUTDIR/codec` (config.json, model.safetensors). The model and the codec each draw from their
own generator (seed + their offset) and the tokenizer is trained without randomness, so changing
one component never changes another. These weights are random: they exercise every code path
(stop logic included) and end turns about 1.4 s after the text, but do not speak.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: `import core.tiny` stays light
    import torch

    from core.model.config import ModelConfig

MODEL_SEED_OFFSET = 1
CODEC_SEED_OFFSET = 2


def write_tiny_tokenizer(model_dir: Path) -> None:
    """Text stream: byte-level BPE tokenizer (Qwen pre-tokenizer rules) with the five special tokens.

    Writes `tokenizer.json` and `tokenizer_config.json` that `AutoTokenizer.from_pretrained` loads,
    shaped like the shipped Qwen tokenizer (NFC, Qwen2 split regex, ByteLevel bytes, no BOS) so the
    incremental tokenizer and the prompt builder are exercised on the same rules as the real one.
    The 166 merges are learned from `_TOKENIZER_CORPUS`; the result is deterministic (the trainer
    breaks count ties by pair order), which `tests/core/test_text.py` checks.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from tokenizers.trainers import BpeTrainer

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = TemplateProcessing(single="$A", pair="$A $B:1")  # no BOS, like Qwen
    trainer = BpeTrainer(
        vocab_size=_TINY_REGULAR_TOKENS,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    assert tok.get_vocab_size() == _TINY_REGULAR_TOKENS, "tiny corpus too small for 166 merges"
    tok.add_special_tokens(list(_TINY_SPECIALS))
    for offset, name in enumerate(_TINY_SPECIALS):
        assert tok.token_to_id(name) == _TINY_REGULAR_TOKENS + offset, f"{name} got the wrong id"
    tok.save(str(model_dir / "tokenizer.json"))
    config = {
        "backend": "tokenizers",
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 40960,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2) + "\n", encoding="utf-8"
    )


# Qwen2/Qwen3 pre-tokenizer split: contractions, letters with one leading non-letter, single digits,
# punctuation runs, newlines, and whitespace that does not precede a non-space.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TINY_REGULAR_TOKENS = 422  # 256 byte symbols + 166 merges
_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_pad|>", "<|text_pad|>")
_TOKENIZER_CORPUS = (
    "Hello there, this is a test of the streaming text to speech model.",
    "The assistant speaks while the language model is still writing the answer.",
    "Could you tell me the weather for tomorrow? It will be sunny in the morning.",
    "Thank you! Please remind me again later, and then we can talk about the plan.",
    "You are a highly expressive text-to-speech engine with natural voice and emotion.",
    "The quick brown fox jumps over the lazy dog; the dog does not mind at all.",
    "I think that we should meet at the station, then walk to the park together.",
    "What time is it? It is about three thirty in the afternoon, I believe.",
    "Our order number is 4711 and the total is 12.50 dollars, paid on 2026-11-25.",
    "Call me at 555 0199 between 9 and 17 o'clock; I'll be there, we're ready.",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "我们正在测试语音合成的流式模型，请稍等一下。",
    "谢谢你！明天见。这个模型可以说中文，也可以说英文。",
    "请问明天的天气怎么样？明天是晴天，温度是二十度。",
)


def write_tiny_model(model_dir: Path, seed: int) -> None:
    """Model stream: tiny MossTTSRealtime config.json + model.safetensors in the official layout.

    Dims mirror the conformance pack (hidden 64, 2+2 layers, 4 heads / 2 KV heads of 16, FFN
    128, text vocab 448), stored in bf16. Head rows 1024/1025 (all heads) and 1026 (heads 1-15)
    are zero so no head picks a special code by chance. Otherwise random, except that turns end
    like a model's: about 18 frames (1.4 s) after the first `<|text_pad|>` row, so the audio's
    length follows the text (see `_arrange_turn_end`).
    """
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config = _tiny_model_config()
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(_tiny_model_tensors(config, seed), str(model_dir / "model.safetensors"),
              metadata={"format": "pt"})


def _tiny_model_config() -> dict:
    """Official config.json shape: legacy rope form in the backbone, both forms in the local."""
    common = {
        "attention_bias": False, "attention_dropout": 0.0, "head_dim": 16, "hidden_act": "silu",
        "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "use_cache": True,
    }
    language = dict(common, bos_token_id=422, eos_token_id=424, pad_token_id=422,
                    layer_types=["full_attention"] * 2, max_position_embeddings=40960,
                    max_window_layers=28, model_type="qwen3", rope_scaling=None,
                    rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
                    use_sliding_window=False, vocab_size=448)
    local = dict(common, audio_pad_token=1024, audio_vocab_size=1027, max_position_embeddings=33,
                 model_type="moss_tts_realtime_local_transformer", pad_token_id=1024,
                 rope_parameters={"factor": 1.0, "rope_theta": 1000000, "rope_type": "linear"},
                 rope_theta=1000000, rope_type="linear", rvq=16)
    return {
        "architectures": ["MossTTSRealtime"], "audio_pad_token": 1024, "audio_vocab_size": 1027,
        "dtype": "bfloat16", "initializer_range": 0.02, "language_config": language,
        "local_config": local, "model_type": "moss_tts_realtime", "reference_audio_pad": 425,
        "rvq": 16, "text_pad": 426, "transformers_version": "5.0.0",
    }


# Reserved residual channels of the tiny backbone; no layer writes them (o_proj/down_proj rows 0).
_PAD_FLAG, _PAD_SHARE, _BIAS = 0, 1, 2
_RESERVED = slice(0, 3)
_PAD_FLAG_VALUE = 4.0  # channel-0 value of the <|text_pad|> embedding
_BIAS_VALUE = 1.0  # channel-2 value of every text embedding: a constant for q, k and the EOS cut
# Layer-0 head 0 attends with weights exp(sum_j A_j (cos(theta_j d) - 1)) over row distance d,
# using RoPE pairs 2..5 (theta_j = 1e6^(-j/8)): about 10 rows wide, and more than 15 nats below
# the peak for every d from 60 rows to the 32768-row context, so old turns never leak in.
_WINDOW_AMPLITUDES = {2: 10.0, 3: 40.0, 4: 60.0, 5: 60.0}
_PAD_ROW_VALUE = 7.23  # v of a pad row: flag / RMS of that row (4 / 0.553; +-1% over codes)
_EOS_SHARE = 0.93  # EOS wins once this share of the window is text padding (~18 pad rows)
_EOS_GAIN = 1000.0


def _tiny_model_tensors(config: dict, seed: int) -> dict[str, torch.Tensor]:
    import torch

    from core.model.config import ModelConfig
    from core.model.weights import DUPLICATE_TEXT_EMBED, official_shapes

    cfg = ModelConfig.from_dict(config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(official_shapes(cfg).items()):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = 0.05 * torch.randn(shape, generator=gen)
        if "embed_tokens" in name:
            t[:, _RESERVED] = 0.0  # only the arrangement below writes the reserved channels
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t[_RESERVED] = 0.0  # no layer writes them either
        if name in ("language_model.norm.weight", "local_transformer.model.norm.weight"):
            t[_RESERVED] = 1.0
        out[name] = t
    for j in range(cfg.rvq):
        audio = out[f"embed_tokens.{j + 1}.weight"]
        head = out[f"local_transformer.local_lm_heads.{j}.weight"]
        audio[cfg.audio_pad_code] = 0.0
        head[cfg.audio_pad_code] = 0.0
        head[cfg.audio_bos_code] = 0.0
        head[cfg.audio_eos_code] = 0.0
        if j > 0:
            audio[cfg.audio_bos_code] = 0.0
            audio[cfg.audio_eos_code] = 0.0
    for j in range(cfg.rvq - 1):
        out[f"local_transformer.model.embed_tokens.{j}.weight"][cfg.audio_pad_code] = 0.0
    _arrange_turn_end(out, cfg)
    out[DUPLICATE_TEXT_EMBED] = out["embed_tokens.0.weight"].clone()
    return {k: v.to(torch.bfloat16).contiguous() for k, v in out.items()}


def _arrange_turn_end(out: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Make codebook 0's EOS win once the recent rows are mostly text padding.

    A real model keeps speaking for a while after its text runs out (audio trails text by the
    12-row lead); random weights would end at a random frame. Channel 0 flags `<|text_pad|>`
    rows; backbone layer-0 head 0 has row-independent q and k (from the constant channel 2, made
    exact by q/k-norm), so RoPE alone sets its weights, a window over the last ~10 rows, and its
    value is the flag: channel 1 = share of padding in that window. Codebook 0's EOS logit is
    `_EOS_GAIN * (share - _EOS_SHARE)`, read through channels 1 and 2 (both pass every norm with
    weight 1, so their ratio survives): far below every code on text rows, on top about 18 pad
    rows in. Everything else stays random.
    """
    hd = cfg.backbone.head_dim
    layer = "language_model.layers.0."
    out["embed_tokens.0.weight"][:, _BIAS] = _BIAS_VALUE
    out["embed_tokens.0.weight"][cfg.text_pad_id, _PAD_FLAG] = _PAD_FLAG_VALUE
    out[layer + "input_layernorm.weight"][_RESERVED] = 1.0
    q, k, v = (out[layer + f"self_attn.{n}_proj.weight"] for n in "qkv")
    q[:hd], k[:hd], v[:hd] = 0.0, 0.0, 0.0  # query head 0 and KV head 0
    for j, amplitude in _WINDOW_AMPLITUDES.items():
        q[j::hd], k[j::hd] = 0.0, 0.0  # the other heads leave the amplified dims alone
        q[j, _BIAS] = k[j, _BIAS] = 1.0
        # q/k-norm scale each of the 4 dims to 2: the score term is q_j k_j / sqrt(hd) = A_j
        out[layer + "self_attn.q_norm.weight"][j] = amplitude**0.5
        out[layer + "self_attn.k_norm.weight"][j] = amplitude**0.5
    v[0, _PAD_FLAG] = 1.0
    out[layer + "self_attn.o_proj.weight"][_PAD_SHARE, 0] = 1.0 / _PAD_ROW_VALUE
    eos = out["local_transformer.local_lm_heads.0.weight"][cfg.audio_eos_code]
    eos[_PAD_SHARE] = _EOS_GAIN
    eos[_BIAS] = -_EOS_GAIN * _EOS_SHARE / _BIAS_VALUE


def write_tiny_codec(codec_dir: Path, seed: int) -> None:
    """Codec stream: tiny MOSS-Audio-Tokenizer config.json + model.safetensors (1920-sample frames).

    Same stage chain as the official codec (patch 240/2/2/2, 32 RLFQ codebooks of 1024 x 8) with
    tiny widths and 0.64 s attention windows (64/32/16/8 positions per stage), so streaming tests
    cross every window within a few seconds of audio. Written tensor by tensor in the official
    names (weight-norm parametrised quantizer convs included), fp32, from a seeded generator.
    """
    import torch
    from safetensors.torch import save_file

    config = _tiny_codec_config()
    gen = torch.Generator().manual_seed(seed)
    shapes = _tiny_codec_shapes(config)
    tensors = {name: _tiny_codec_tensor(name, shape, gen) for name, shape in shapes}
    codec_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(codec_dir / "model.safetensors"), metadata={"format": "pt"})
    (codec_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _tiny_codec_stage(d_in: int, d: int, d_out: int, heads: int, layers: int = 2) -> dict:
    return {
        "module_type": "Transformer", "causal": True, "conv_layout": True, "d_model": d,
        "dim_feedforward": 2 * d, "gating": "none", "input_dimension": d_in, "layer_scale": 0.01,
        "max_period": 10000, "norm": "layer_norm", "num_heads": heads, "num_layers": layers,
        "output_dimension": d_out, "positional_embedding": "rope",
    }


def _tiny_codec_config() -> dict:
    patch = lambda p: {"module_type": "PatchedPretransform", "patch_size": p}  # noqa: E731
    encoder = [
        patch(240), _tiny_codec_stage(240, 32, 16, 2), patch(2), _tiny_codec_stage(32, 32, 16, 2),
        patch(2), _tiny_codec_stage(32, 32, 24, 2), patch(2), _tiny_codec_stage(48, 48, 32, 3),
    ]
    decoder = [
        _tiny_codec_stage(32, 48, 48, 3), patch(2), _tiny_codec_stage(24, 32, 32, 2), patch(2),
        _tiny_codec_stage(16, 32, 32, 2), patch(2), _tiny_codec_stage(16, 32, 240, 2), patch(240),
    ]
    return {
        "architectures": ["MossAudioTokenizerModel"],
        "model_type": "speech_tokenizer",
        "sampling_rate": 24000,
        "sample_rate": 24000,
        "downsample_rate": 1920,
        "causal_transformer_context_duration": 0.64,
        "code_dim": 32,
        "dtype": "float32",
        "encoder_kwargs": encoder,
        "decoder_kwargs": decoder,
        "reversed_decoder_kwargs": encoder,
        "quantizer_type": "rlfq",
        "quantizer_kwargs": {
            "quantizer_type": "rlfq", "input_dim": 32, "rvq_dim": 16, "output_dim": 32,
            "num_quantizers": 32, "codebook_size": 1024, "codebook_dim": 8,
        },
    }


def _tiny_codec_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Official tensor names and shapes for `config` (mirrors upstream's module tree)."""
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for part in ("encoder", "decoder"):
        for i, st in enumerate(config[f"{part}_kwargs"]):
            if st["module_type"] != "Transformer":
                continue
            d, ff, pre = st["d_model"], st["dim_feedforward"], f"{part}.{i}"
            if st["input_dimension"] != d:
                shapes.append((f"{pre}.input_proj.weight", (d, st["input_dimension"])))
            if st["output_dimension"] != d:
                shapes.append((f"{pre}.output_proj.weight", (st["output_dimension"], d)))
            for layer in range(st["num_layers"]):
                lp = f"{pre}.transformer.layers.{layer}"
                shapes += [
                    (f"{lp}.self_attn.in_projs.0.weight", (3 * d, d)),
                    (f"{lp}.self_attn.out_projs.0.weight", (d, d)),
                    (f"{lp}.linear1.weight", (ff, d)), (f"{lp}.linear2.weight", (d, ff)),
                ]
                for n in ("norm1", "norm2"):
                    shapes += [(f"{lp}.{n}.weight", (d,)), (f"{lp}.{n}.bias", (d,))]
                shapes += [(f"{lp}.layer_scale_{k}.scale", (d,)) for k in (1, 2)]
    q = config["quantizer_kwargs"]
    convs = [
        ("input_proj", q["rvq_dim"], q["input_dim"]),
        ("output_proj", q["output_dim"], q["rvq_dim"]),
    ]
    for i in range(q["num_quantizers"]):
        convs += [(f"quantizers.{i}.in_proj", q["codebook_dim"], q["rvq_dim"]),
                  (f"quantizers.{i}.out_proj", q["rvq_dim"], q["codebook_dim"])]
        shapes.append((f"quantizer.quantizers.{i}.codebook.weight",
                       (q["codebook_size"], q["codebook_dim"])))
    for name, out_dim, in_dim in convs:
        shapes += [
            (f"quantizer.{name}.parametrizations.weight.original0", (out_dim, 1, 1)),
            (f"quantizer.{name}.parametrizations.weight.original1", (out_dim, in_dim, 1)),
            (f"quantizer.{name}.bias", (out_dim,)),
        ]
    return shapes


def _tiny_codec_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator
) -> torch.Tensor:
    """Random values with sane scales: unit-ish activations so every stage matters."""
    import torch

    if name.endswith(".scale"):  # layer scale: large enough that attention visibly matters
        return torch.empty(shape).uniform_(0.1, 0.5, generator=gen)
    if name.endswith("original0"):  # weight-norm g
        return torch.empty(shape).uniform_(0.5, 1.5, generator=gen)
    if ".norm" in name and name.endswith(".weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.05 * torch.randn(shape, generator=gen)
    fan_in = shape[1] if len(shape) > 1 else 1
    std = 1.0 if "codebook" in name else fan_in**-0.5
    if name.startswith("decoder.") and name.endswith("output_proj.weight"):
        std *= 0.05  # waveform out: keep the tiny codec's audio mostly inside [-1, 1]
    return std * torch.randn(shape, generator=gen)


def write_tiny(outdir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny model (with tokenizer) and codec under `outdir`; returns their directories."""
    outdir = Path(outdir)
    model_dir, codec_dir = outdir / "model", outdir / "codec"
    model_dir.mkdir(parents=True, exist_ok=True)
    codec_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(model_dir)
    write_tiny_model(model_dir, seed + MODEL_SEED_OFFSET)
    write_tiny_codec(codec_dir, seed + CODEC_SEED_OFFSET)
    return model_dir, codec_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model_dir, codec_dir = write_tiny(args.outdir, args.seed)
    print(f"tiny model: {model_dir}\ntiny codec: {codec_dir}")


if __name__ == "__main__":
    main()
