"""GPU check of the codec at the real dimensions (random weights; not part of CI).

Checks on the device what CPU tests can only check on the tiny codec, then times it:
1. batched streaming decode (slots with different offsets, gathered slot ids) equals whole-clip
   windowed decode past the 10 s window (140 frames), in float32;
2. bfloat16 decode error against float32;
3. decode_step time per frame at several batch sizes (fp32 and bf16), peak memory, state size.

    python benchmarks/gpu_check_codec.py                 # needs CUDA; ~1-2 min on an H100
    python benchmarks/gpu_check_codec.py --dims tiny --device cpu   # smoke run of the script
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("codec_bench", Path(__file__).with_name("codec.py"))
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def build(dims: str, device: str, dtype: torch.dtype):
    if dims == "real":
        return bench.random_codec(bench.real_config(), device, dtype, ("decoder",))
    import tempfile

    from core.codec import MossAudioCodec
    from core.tiny import write_tiny_codec

    tmp = tempfile.mkdtemp()
    write_tiny_codec(Path(tmp), seed=0)
    return MossAudioCodec.from_pretrained(tmp, device=device, dtype=dtype)


@torch.no_grad()
def check_streaming(codec, frames: int, device: str) -> dict:
    """Three streams starting at frames 0, 7 and 20 in slots [5, 0, 3] of 6."""
    starts, slot_ids = [0, 7, 20], [5, 0, 3]
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1024, (frames - s, 16), generator=gen) for s in starts]
    state = codec.init_decode_state(6)
    outs: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in range(frames):
        live = [i for i, s in enumerate(starts) if step >= s]
        codes = torch.stack([seqs[i][step - starts[i]] for i in live]).to(device)
        out = codec.decode_step(codes, torch.tensor([slot_ids[i] for i in live]), state)
        for row, i in enumerate(live):
            outs[i].append(out[row])
    errors = []
    for i, seq in enumerate(seqs):
        offline = codec.decode(seq.to(device))
        streamed = torch.cat(outs[i])
        scale = offline.abs().max().clamp_min(1e-6)
        errors.append(float((streamed - offline).abs().max() / scale))
    return {"frames": frames, "max_rel_err": max(errors), "ok": max(errors) < 1e-3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dims", default="real", choices=["tiny", "real"])
    parser.add_argument("--frames", type=int, default=140, help="> 125 crosses the 10 s window")
    parser.add_argument("--batches", default="1,8,32,64")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("CUDA is not available; use --device cpu --dims tiny for a smoke run")
    torch.set_num_threads(1)
    report: dict = {"bench": "gpu_check_codec", "device": args.device, "dims": args.dims}
    codec = build(args.dims, args.device, torch.float32)
    report["streaming_fp32"] = check_streaming(codec, args.frames, args.device)
    print("streaming == offline (fp32):", report["streaming_fp32"], flush=True)

    codes = torch.randint(0, 1024, (40, 16), generator=torch.Generator().manual_seed(1))
    reference = codec.decode(codes.to(args.device))
    codec.decoder.to(torch.bfloat16)  # the quantizer stays fp32 by design
    bf16 = codec.decode(codes.to(args.device))
    report["bf16_rel_err"] = float((bf16 - reference).abs().max() / reference.abs().max())
    print("bf16 vs fp32 max rel err:", report["bf16_rel_err"], flush=True)

    timings = []
    for dtype in (torch.float32, torch.bfloat16):
        codec.decoder.to(dtype)
        for batch in (int(b) for b in args.batches.split(",")):
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            row = bench.bench_decode(codec, batch, frames=20, warmup=5, device=args.device)
            row["dtype"] = str(dtype).removeprefix("torch.")
            if args.device.startswith("cuda"):
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            timings.append(row)
            print(row, flush=True)
    report["decode_step"] = timings
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
