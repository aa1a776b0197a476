"""Codec benchmark: streaming decode time per 80 ms frame vs batch size, and encode speed.

Runs the tiny codec (core.tiny) and the real MOSS-Audio-Tokenizer dimensions (1.77 B params,
random weights built in memory: no download). Prints a table and one JSON line. Ratios are to real
time: `rtf` = compute time / audio time (< 1 keeps up), `streams_rt` = streams one device could
keep in real time at that batch size (batch * 80 ms / step time).

    python benchmarks/codec.py                          # CPU: tiny 1/8/32, real 1/8 (few frames)
    python benchmarks/codec.py --device cuda --dims real --batches 1,8,32,64 --frames 30
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from core.codec import CodecConfig, MossAudioCodec
from core.tiny import write_tiny_codec

FRAME_S = 0.08


def _stage(d_in: int, d: int, d_out: int, heads: int, layers: int, ff: int) -> dict[str, Any]:
    return {
        "module_type": "Transformer",
        "causal": True,
        "conv_layout": True,
        "d_model": d,
        "dim_feedforward": ff,
        "gating": "none",
        "input_dimension": d_in,
        "layer_scale": 0.01,
        "max_period": 10000,
        "norm": "layer_norm",
        "num_heads": heads,
        "num_layers": layers,
        "output_dimension": d_out,
        "positional_embedding": "rope",
    }


def real_config() -> dict[str, Any]:
    """The published OpenMOSS-Team/MOSS-Audio-Tokenizer stage widths (reference section 5.2)."""

    def patch(p: int) -> dict[str, Any]:
        return {"module_type": "PatchedPretransform", "patch_size": p}

    small = (12, 12, 3072)  # heads, layers, ff at d 768
    big = (20, 32, 5120)  # heads, layers, ff at d 1280
    return {
        "sampling_rate": 24000,
        "sample_rate": 24000,
        "downsample_rate": 1920,
        "causal_transformer_context_duration": 10,
        "quantizer_type": "rlfq",
        "encoder_kwargs": [
            patch(240),
            _stage(240, 768, 384, *small),
            patch(2),
            _stage(768, 768, 384, *small),
            patch(2),
            _stage(768, 768, 640, *small),
            patch(2),
            _stage(1280, 1280, 768, *big),
        ],
        "decoder_kwargs": [
            _stage(768, 1280, 1280, *big),
            patch(2),
            _stage(640, 768, 768, *small),
            patch(2),
            _stage(384, 768, 768, *small),
            patch(2),
            _stage(384, 768, 240, *small),
            patch(240),
        ],
        "quantizer_kwargs": {
            "quantizer_type": "rlfq",
            "input_dim": 768,
            "rvq_dim": 512,
            "output_dim": 768,
            "num_quantizers": 32,
            "codebook_size": 1024,
            "codebook_dim": 8,
        },
    }


@torch.no_grad()
def random_codec(
    config: dict[str, Any], device: str, dtype: torch.dtype, parts: tuple[str, ...]
) -> MossAudioCodec:
    """Random weights straight into memory, only for `parts` (the rest stays on meta)."""
    with torch.device("meta"):
        codec = MossAudioCodec(CodecConfig.from_dict(copy.deepcopy(config)))
    gen = torch.Generator(device="cpu").manual_seed(0)
    codec.quantizer.to_empty(device=device)
    for p in codec.quantizer.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    codec.quantizer.refresh()
    for part in parts:
        module = getattr(codec, part).to_empty(device=device)
        for name, p in module.named_parameters():
            if name.endswith(".scale"):
                p.fill_(0.01)
            elif ".norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02)
        module.to(dtype)
    return codec.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_decode(codec: MossAudioCodec, batch: int, frames: int, warmup: int, device: str) -> dict:
    state = codec.init_decode_state(batch)
    slots = torch.arange(batch)
    gen = torch.Generator().manual_seed(batch)
    codes = torch.randint(0, 1024, (warmup + frames, batch, 16), generator=gen).to(device)
    for i in range(warmup):
        codec.decode_step(codes[i], slots, state)
    _sync(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + frames):
        codec.decode_step(codes[i], slots, state)
    _sync(device)
    step = (time.perf_counter() - start) / frames
    return {
        "batch": batch,
        "ms_per_step": round(step * 1e3, 3),
        "rtf": round(step / FRAME_S, 4),
        "streams_rt": round(batch * FRAME_S / step, 2),
        "state_mb_per_slot": round(state.nbytes() / batch / 2**20, 2),
    }


def bench_encode(codec: MossAudioCodec, seconds: float, device: str) -> dict:
    wave = torch.randn(int(seconds * 24000), generator=torch.Generator().manual_seed(0)) * 0.1
    codec.encode(wave[:24000])  # warm-up
    _sync(device)
    start = time.perf_counter()
    codec.encode(wave)
    _sync(device)
    elapsed = time.perf_counter() - start
    return {
        "audio_s": seconds,
        "ms_per_audio_s": round(elapsed / seconds * 1e3, 2),
        "rtf": round(elapsed / seconds, 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--dims", default="both", choices=["tiny", "real", "both"])
    parser.add_argument("--batches", default=None, help="comma list; default depends on device")
    parser.add_argument("--frames", type=int, default=None, help="timed frames per batch size")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (shared machine: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    on_cpu = args.device == "cpu"
    results: list[dict] = []
    dims = ["tiny", "real"] if args.dims == "both" else [args.dims]
    for dim in dims:
        real = dim == "real"
        default_batches = "1,8" if real and on_cpu else "1,8,32"
        batches = [int(b) for b in (args.batches or default_batches).split(",")]
        frames = args.frames or (3 if real and on_cpu else 20)
        warmup = 1 if real and on_cpu else 3
        if real:
            codec = random_codec(real_config(), args.device, dtype, ("decoder",))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                write_tiny_codec(Path(tmp), seed=0)
                codec = MossAudioCodec.from_pretrained(tmp, device=args.device, dtype=dtype)
        for batch in batches:
            row = {
                "dims": dim,
                "op": "decode_step",
                **bench_decode(codec, batch, frames, warmup, args.device),
            }
            results.append(row)
            print(
                f"{dim:5s} decode batch {batch:3d}: {row['ms_per_step']:9.2f} ms/step  "
                f"rtf {row['rtf']:.3f}  real-time streams {row['streams_rt']:.1f}  "
                f"state {row['state_mb_per_slot']:.1f} MiB/slot",
                flush=True,
            )
        if real:  # free the decoder before building the encoder (7 GB fp32 for both)
            del codec
            codec = random_codec(real_config(), args.device, dtype, ("encoder",))
        row = {
            "dims": dim,
            "op": "encode",
            **bench_encode(codec, 2.0 if real and on_cpu else 10.0, args.device),
        }
        results.append(row)
        print(
            f"{dim:5s} encode: {row['ms_per_audio_s']:9.2f} ms per audio second  "
            f"rtf {row['rtf']:.3f}",
            flush=True,
        )
        del codec
    meta = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    print(json.dumps({"bench": "codec", **meta, "results": results}))


if __name__ == "__main__":
    main()
