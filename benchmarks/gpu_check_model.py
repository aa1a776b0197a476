"""GPU check for the model stream (not part of CI): correctness on CUDA, then frame timings.

    .venv/bin/python benchmarks/gpu_check_model.py [--conformance tests/fixtures/conformance]

1. Loads the conformance checkpoint on CUDA in fp32 and checks the prefill hidden states and the
   argmax codes of scenario `text_audio` against upstream's outputs (same checks as the CPU test).
2. Checks that a batched frame on CUDA equals frames sampled alone (seeded randomness is
   batch-invariant on the device too).
3. Times frames at the real dimensions (random weights, bf16) for batch 1/8/32/64.
Exits non-zero when a check fails; prints a JSON line with the timings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from core.model import KVPool, MossTTSRealtime, SamplerBatch, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # scripts, not a package
from model_step import run  # noqa: E402


@torch.inference_mode()
def conformance_parity(conformance: Path, device: torch.device) -> dict:
    """The conformance checks on `device` as numbers (no printing, no exit): prefill max abs
    diff against upstream, decided argmax codes that differ, rows that differ batched vs alone."""
    ref = np.load(conformance / "ref_outputs.npz")
    model = MossTTSRealtime.from_pretrained(
        conformance / "model", device=device, dtype=torch.float32
    )
    kv = KVPool(model.config, num_blocks=32, block_size=16, device=device, dtype=torch.float32)
    seq = kv.new_sequence()
    pre = torch.from_numpy(ref["tts/text_audio/prefill_input_ids"])
    hidden = model.forward_rows([pre], [seq], kv, all_rows=True)
    err = (hidden.cpu() - torch.from_numpy(ref["tts/text_audio/prefill_hidden"])).abs().max().item()
    sampler = SamplerBatch.from_params([SamplingParams(temperature=0)], device=device)
    codes = [model.sample_frame(hidden[-1:], sampler)]
    for row in torch.from_numpy(ref["tts/text_audio/step_input_ids"]):
        codes.append(model.sample_frame(model.forward_rows([row[None]], [seq], kv), sampler))
    got = torch.cat(codes).cpu()
    decided = torch.from_numpy(ref["tts/text_audio/decision_margin"]) >= 1e-4
    wrong = ((got != torch.from_numpy(ref["tts/text_audio/frames"])) & decided).sum().item()

    params = [SamplingParams(seed=s) for s in range(4)]
    h = torch.randn(4, model.config.hidden_size, device=device) * 3
    batched = model.sample_frame(h, SamplerBatch.from_params(params, device=device))
    differ = []
    for i, p in enumerate(params):
        alone = model.sample_frame(h[i : i + 1], SamplerBatch.from_params([p], device=device))
        if not torch.equal(alone[0], batched[i]):
            differ.append(i)
    return {"prefill_max_abs_diff": err, "decided_codes_wrong": wrong,
            "batched_vs_alone_rows_differ": differ, "ok": not (err > 1e-3 or wrong)}


def check_parity(conformance: Path, device: torch.device) -> None:
    r = conformance_parity(conformance, device)
    err, wrong = r["prefill_max_abs_diff"], r["decided_codes_wrong"]
    print(f"parity on {device}: prefill max abs diff {err:.2e}, decided codes wrong: {wrong}")
    if not r["ok"]:
        sys.exit("CUDA parity check failed")
    for i in r["batched_vs_alone_rows_differ"]:
        print(f"note: row {i} differs batched vs alone (fp32 kernel differences on CUDA)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conformance", type=Path, default=ROOT / "tests" / "fixtures" / "conformance")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--frames", type=int, default=20)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: nothing to check")
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device))
    if a.conformance.is_dir():
        check_parity(a.conformance, device)
    else:
        print(f"conformance pack not found at {a.conformance}: parity check skipped")
    run("tiny", "cuda", "fp32", a.batches, a.context, a.frames, 3, label="gpu_check_model")
    run("real", "cuda", "bf16", a.batches, a.context, a.frames, 3, label="gpu_check_model")


if __name__ == "__main__":
    main()
