"""Time per 80 ms frame vs batch size: one backbone step over a realistic context + 16 depth
steps + batched sampling. Random weights (tiny config, or the real MOSS-TTS-Realtime dims).

    .venv/bin/python benchmarks/model_step.py                      # tiny, batch 1/8/32
    .venv/bin/python benchmarks/model_step.py --dims real --batches 1 8 --frames 2 --context 256

Warm-up frames are excluded and the device is synced before each clock read. Prints one line
per batch (step ms, aggregate frames/s, and per-stream speed as a multiple of real time, where
1.0 = 12.5 frames/s per stream) and one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from core.model import KVPool, ModelConfig, MossTTSRealtime, SamplerBatch, SamplingParams

FRAME_RATE = 12.5  # frames/s of one real-time stream


def _transformer(layers: int, hidden: int, heads: int, kv: int, head_dim: int, ffn: int) -> dict:
    return {
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim, "intermediate_size": ffn,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
    }  # fmt: skip


def config_for(dims: str) -> ModelConfig:
    """The tiny test config or the published checkpoint's dimensions (reference section 2.2)."""
    if dims == "tiny":
        lang, local, vocab, pads = (
            _transformer(2, 64, 4, 2, 16, 128),
            _transformer(2, 64, 4, 2, 16, 128),
            448,
            (426, 425),
        )
    else:
        lang, local = (
            _transformer(28, 2048, 16, 8, 128, 6144),
            _transformer(4, 2048, 16, 8, 128, 6144),
        )
        vocab, pads = 151936, (151655, 151654)
    lang["vocab_size"] = vocab
    return ModelConfig.from_dict({
        "language_config": lang, "local_config": local, "rvq": 16, "audio_vocab_size": 1027,
        "audio_pad_token": 1024, "text_pad": pads[0], "reference_audio_pad": pads[1],
    })  # fmt: skip


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> MossTTSRealtime:
    """Random weights at init scale; timing does not depend on their values."""
    with torch.device(device):
        model = MossTTSRealtime(config).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_rows(n: int, vocab: int, device: torch.device) -> torch.Tensor:
    rows = torch.randint(0, 1024, (n, 17), device=device)
    rows[:, 0] = torch.randint(0, vocab, (n,), device=device)
    return rows


@torch.inference_mode()
def time_batch(
    model: MossTTSRealtime, batch: int, context: int, frames: int, warmup: int, block_size: int = 64
) -> dict:
    """Mean seconds per frame for `batch` streams that already hold `context` rows each."""
    device, cfg = model.device, model.config
    per_seq = -(-(context + frames + warmup + 1) // block_size)
    kv = KVPool(
        cfg, num_blocks=batch * per_seq, block_size=block_size, device=device, dtype=model.dtype
    )
    seqs = [kv.new_sequence() for _ in range(batch)]
    for s in seqs:  # prefill one stream at a time, in chunks (not timed)
        for start in range(0, context, 512):
            model.forward_rows(
                [_random_rows(min(512, context - start), cfg.text_vocab_size, device)], [s], kv
            )
    sampler = SamplerBatch.from_params(
        [SamplingParams(seed=i) for i in range(batch)], device=device
    )
    frame = torch.randint(0, 1024, (batch, 16), device=device)
    text = torch.randint(0, cfg.text_vocab_size, (batch, 1), device=device)

    def step(frame: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([text, frame], dim=1)
        hidden = model.forward_rows(list(rows[:, None]), seqs, kv)
        return model.sample_frame(hidden, sampler).clamp_(max=1023)

    for _ in range(warmup):
        frame = step(frame)
    _sync(device)
    start = time.perf_counter()
    for _ in range(frames):
        frame = step(frame)
    _sync(device)
    seconds = (time.perf_counter() - start) / frames
    return {
        "batch": batch, "context": context, "frames": frames, "step_ms": seconds * 1e3,
        "frames_per_s": batch / seconds, "stream_x_realtime": 1.0 / seconds / FRAME_RATE,
    }  # fmt: skip


def run(
    dims: str,
    device: str,
    dtype: str,
    batches: list[int],
    context: int,
    frames: int,
    warmup: int,
    label: str = "model_step",
) -> list[dict]:
    dev = torch.device(device)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = random_model(config_for(dims), dev, torch_dtype)
    results = []
    for batch in batches:
        r = time_batch(model, batch, context, frames, warmup)
        r.update(dims=dims, device=device, dtype=dtype, threads=torch.get_num_threads())
        results.append(r)
        print(
            f"{dims:5s} {device:5s} {dtype:4s} batch {batch:3d} ctx {context:5d}: "
            f"{r['step_ms']:9.2f} ms/frame  {r['frames_per_s']:9.1f} frames/s  "
            f"{r['stream_x_realtime']:7.2f}x real time per stream",
            flush=True,
        )
    print(json.dumps({"benchmark": label, "results": results}))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", choices=["tiny", "real"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="default: fp32 for tiny, bf16 for real",
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context", type=int, default=None, help="rows per stream (default 512/256)")
    p.add_argument(
        "--frames", type=int, default=None, help="timed frames (default 20 tiny, 2 real)"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    real = a.dims == "real"
    run(
        a.dims,
        a.device,
        a.dtype or ("bf16" if real else "fp32"),
        a.batches,
        a.context or (256 if real else 512),
        a.frames or (2 if real else 20),
        a.warmup,
    )


if __name__ == "__main__":
    main()
