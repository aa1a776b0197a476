"""One GPU run, everything: CUDA parity on the tiny checkpoint, then speed and memory at the real
dimensions, inside a time budget. Not part of CI (its quick CPU mode is: a smoke test).

    python benchmarks/gpu_suite.py                          # CUDA, --budget-s 450 (~8 min in all)
    .venv/bin/python benchmarks/gpu_suite.py --device cpu --quick   # CPU smoke run, tiny dims

Phases (each is timed; one that would not fit in what is left of `--budget-s` is recorded as
"skipped: time budget", and a watchdog prints what is done and exits 3 at budget + 30 s):

1. parity (tiny checkpoint from `core.tiny.write_tiny`): the model on the device (fp32) against
   the CPU in float64, fed the same rows (teacher-forced with the reference's codes), greedy and
   sampled (seeded): hidden states and local logits within 1e-4 (the tiny parity tests' TOL),
   codes equal wherever the float64 reference decides them by >= 1e-4 (its top-2 gap after
   penalty, filtering and the seeded noise); the tiny codec's decode on the device against CPU
   float64 within 2e-5 (the codec streaming tests' atol) and streaming == whole clip on the
   device (`gpu_check_codec.check_streaming`); the upstream conformance pack on the device
   (`gpu_check_model.conformance_parity`); the whole `Engine` on the device (fp32) against the
   CPU engine in float64: same frames per turn and PCM within 2 LSB, greedy and sampled.
2. real dimensions, random weights (bf16 model, fp32 codec, as `benchmarks/engine.py --dims
   real` builds them): one-stream frame time (`model_step.time_batch`); KV bytes per row and per
   conversation (computed, and measured as the `torch.cuda.max_memory_allocated` delta of a
   pool); then through the real `Engine`, for each N: capacity (unpaced frames/s) and paced
   first audio p50/p95 and underruns (`benchmarks/engine.py`'s `capacity_round` and `latency`),
   with peak device memory. Frame steps: eager; `compiled` where `EngineConfig.compile_step`
   applies (the CPU only); CUDA graphs are not built yet and are reported as such.
3. a table, then one JSON line (GPU name, torch version, every phase's result or skip reason,
   total wall time). Exit code 1 when a parity check fails (or raises), 4 when one did not run
   (time budget), 3 on the watchdog, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # scripts, not a package
sys.path.insert(0, str(ROOT))

import engine as engine_bench  # noqa: E402  (benchmarks/engine.py)
import gpu_check_codec  # noqa: E402
import gpu_check_model  # noqa: E402
import model_step  # noqa: E402

from core import Engine, EngineConfig, SamplingParams  # noqa: E402
from core.codec import MossAudioCodec  # noqa: E402
from core.model import KVPool, MossTTSRealtime, SamplerBatch  # noqa: E402
from core.model.noise import gumbel  # noqa: E402

TOL = 1e-4  # hidden states and logits (tests/core/test_model_tiny_parity.py)
MARGIN = 1e-4  # codes are compared where the reference decides them by this much
CODEC_ATOL = 2e-5  # tests/core/test_codec_streaming.py
PCM_LSB = 2  # engine PCM (int16): fp32 vs float64 audio may round to a neighbouring step
FRAME_RATE = 12.5
HARD_GRACE_S = 30.0
PARITY_PHASES = ("parity_model", "parity_codec", "parity_conformance", "parity_engine")


# -- bookkeeping ---------------------------------------------------------------------------------
class Suite:
    """Phase results, the time budget and the watchdog."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.phases: dict[str, dict] = {}
        self.meta: dict = {}
        self.lock = threading.Lock()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def run(self, name: str, need_s: float, fn: Callable[[], dict]) -> dict:
        """Run `fn` as phase `name` if about `need_s` seconds are left; record its result."""
        if self.left() < need_s:
            result = {"skipped": f"time budget ({self.left():.0f} s left, needs ~{need_s:.0f} s)"}
        else:
            start = time.perf_counter()
            try:
                result = fn()
            except Exception as exc:  # a phase that raises is recorded, the others still run
                traceback.print_exc()
                result = {"error": f"{type(exc).__name__}: {exc}", "ok": False}
            result["seconds"] = round(time.perf_counter() - start, 2)
        with self.lock:
            self.phases[name] = result
        print(f"[{self.elapsed():6.1f} s] {name}: {_short(result)}", flush=True)
        return result

    def parity(self) -> str:
        """"ok", "failed" (a check failed or raised) or "incomplete" (a check did not run)."""
        parity = [v for k, v in self.phases.items() if k.startswith("parity")]
        if any(v.get("ok") is False for v in parity):
            return "failed"
        if len(parity) < len(PARITY_PHASES) or any(v.get("ok") is not True for v in parity):
            return "incomplete"
        return "ok"

    def report(self, aborted: str | None = None) -> dict:
        with self.lock:
            out = {"bench": "gpu_suite", **self.meta, "budget_s": self.budget_s,
                   "phases": copy.deepcopy(self.phases), "parity": self.parity(),
                   "parity_ok": self.parity() == "ok",
                   "total_s": round(self.elapsed(), 1)}
        if aborted:
            out["aborted"] = aborted
        return out

    def start_watchdog(self) -> threading.Timer:
        def fire() -> None:
            report = self.report(aborted=f"hard time limit {self.budget_s + HARD_GRACE_S:.0f} s")
            print_table(report)
            print(json.dumps(report), flush=True)
            os._exit(3)

        timer = threading.Timer(self.budget_s + HARD_GRACE_S, fire)
        timer.daemon = True
        timer.start()
        return timer


def _short(result: dict) -> str:
    keep = {k: v for k, v in result.items() if not isinstance(v, list | dict)}
    return json.dumps(keep, default=str)[:300]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- phase 1: parity ------------------------------------------------------------------------------
def _decision_margins(sampler: SamplerBatch, logits: torch.Tensor) -> torch.Tensor:
    """[B, 16] top-2 gap of what each draw takes the argmax of: penalised logits for greedy rows;
    penalised, filtered logits / T plus the seeded Gumbel noise for sampled rows. `sampler` must
    hold the state from before the frame (a copy), `logits` [B, 16, V] the frame's logits."""
    batch, rvq, vocab = logits.shape
    idx = sampler.rows(None, batch)
    frame = sampler.prepare(idx, vocab, logits.dtype)
    margins = torch.empty(batch, rvq, dtype=torch.float64)
    for cb in range(rvq):
        pen = SamplerBatch._penalize(logits[:, cb], cb, frame)
        asc, ids = SamplerBatch._filter_sorted(pen, frame)
        score = asc + gumbel(frame.keys[:, cb, None], frame.id_hash[ids], logits.dtype)
        score = torch.where(frame.greedy[:, None], pen.sort(dim=-1).values, score)
        top2 = score.topk(2, dim=-1).values
        margins[:, cb] = (top2[:, 0] - top2[:, 1]).nan_to_num(nan=float("inf"))
    return margins


@torch.inference_mode()
def model_parity(model_dir: Path, device: torch.device, *, streams: int, prefill: int,
                 frames: int) -> dict:
    """Device fp32 vs CPU float64 on the tiny model, fed identical rows (see module docstring)."""
    ref = MossTTSRealtime.from_pretrained(model_dir, dtype=torch.float32).to(torch.float64)
    dev = MossTTSRealtime.from_pretrained(model_dir, device=device, dtype=torch.float32)
    cfg = ref.config
    per_seq = -(-(prefill + frames + 1) // 16)
    gen = torch.Generator().manual_seed(0)
    out: dict = {"streams": streams, "prefill_rows": prefill, "frames": frames}
    ok = True
    for mode in ("greedy", "sampled"):
        params = [SamplingParams(temperature=0) if mode == "greedy" else SamplingParams(seed=11 + s)
                  for s in range(streams)]
        pools = {m: KVPool(cfg, num_blocks=streams * per_seq, block_size=16,
                           device=m.device, dtype=m.dtype) for m in (ref, dev)}
        seqs = {m: [pools[m].new_sequence() for _ in range(streams)] for m in (ref, dev)}
        samplers = {m: SamplerBatch.from_params(params, device=m.device) for m in (ref, dev)}
        rows = []
        for _ in range(streams):
            r = torch.randint(0, 1024, (prefill, cfg.row_width), generator=gen)
            r[:, 0] = torch.randint(0, cfg.text_vocab_size, (prefill,), generator=gen)
            rows.append(r)
        h_ref = ref.forward_rows(rows, seqs[ref], pools[ref], all_rows=True)
        h_dev = dev.forward_rows([r.to(device) for r in rows], seqs[dev], pools[dev], all_rows=True)
        hidden_err = (h_dev.double().cpu() - h_ref).abs().max().item()
        last = torch.tensor([prefill * (i + 1) - 1 for i in range(streams)])
        h_ref, h_dev = h_ref[last], h_dev[last.to(device)]
        logits_err, logits_scale, step_err, wrong, undecided, compared = 0.0, 0.0, 0.0, 0, 0, 0
        for _ in range(frames):
            probe = copy.deepcopy(samplers[ref])
            lo_ref = torch.zeros(streams, cfg.rvq, cfg.audio_vocab_size, dtype=torch.float64)
            lo_dev = torch.zeros(streams, cfg.rvq, cfg.audio_vocab_size, device=device)
            c_ref = ref.sample_frame(h_ref, samplers[ref], logits_out=lo_ref)
            c_dev = dev.sample_frame(h_dev, samplers[dev], logits_out=lo_dev).cpu()
            logits_err = max(logits_err, (lo_dev.double().cpu() - lo_ref).abs().max().item())
            logits_scale = max(logits_scale, lo_ref.abs().max().item())
            decided = _decision_margins(probe, lo_ref) >= MARGIN
            wrong += int(((c_dev != c_ref) & decided).sum())
            undecided += int((~decided).sum())
            compared += int(decided.sum())
            text = torch.randint(0, cfg.text_vocab_size, (streams, 1), generator=gen)
            step_rows = torch.cat([text, c_ref], dim=1)  # both fed the reference's codes
            h_ref = ref.forward_rows(list(step_rows[:, None]), seqs[ref], pools[ref])
            h_dev = dev.forward_rows(list(step_rows.to(device)[:, None]), seqs[dev], pools[dev])
            step_err = max(step_err, (h_dev.double().cpu() - h_ref).abs().max().item())
        # logits relative to their scale: the tiny EOS head reaches ~1e3, where fp32's own
        # rounding is ~1e-4 (the tiny parity test compares fp32 with fp32, absolutely)
        logits_rel = logits_err / max(1.0, logits_scale)
        mode_ok = hidden_err < TOL and step_err < TOL and logits_rel < TOL and wrong == 0
        ok &= mode_ok
        out[mode] = {"prefill_hidden_max_abs_diff": hidden_err, "step_hidden_max_abs_diff": step_err,
                     "logits_max_abs_diff": logits_err, "logits_max_abs": logits_scale,
                     "logits_rel_diff": logits_rel, "codes_compared": compared,
                     "codes_wrong": wrong, "codes_undecided": undecided, "ok": mode_ok}
    out.update(tol=TOL, margin=MARGIN, ok=ok)
    return out


@torch.inference_mode()
def codec_parity(codec_dir: Path, device: torch.device, *, frames: int) -> dict:
    """Tiny codec: whole-clip decode on the device (fp32) vs CPU float64, and streaming == whole
    clip on the device (`gpu_check_codec.check_streaming`, slots with offsets)."""
    ref = MossAudioCodec.from_pretrained(codec_dir)
    ref.decoder.to(torch.float64)  # the quantizer stays fp32 by design
    dev = MossAudioCodec.from_pretrained(codec_dir, device=device)
    codes = torch.randint(0, 1024, (frames, 16), generator=torch.Generator().manual_seed(3))
    err = (dev.decode(codes.to(device)).double().cpu() - ref.decode(codes).double()).abs().max()
    streaming = gpu_check_codec.check_streaming(dev, frames, str(device))
    ok = bool(err.item() < CODEC_ATOL and streaming["ok"])
    return {"frames": frames, "decode_max_abs_diff_vs_cpu_f64": err.item(), "atol": CODEC_ATOL,
            "streaming_vs_whole_clip": streaming, "ok": ok}


async def _engine_turns(engine: Engine, params: list[SamplingParams], text: str) -> list[bytes]:
    async def one(p: SamplingParams) -> bytes:
        conv = engine.conversation(sampling=p)
        pcm = []
        async with conv.speak() as stream:
            stream.push_text(text)
            stream.end_text()
            async for chunk in stream:
                pcm.append(chunk.pcm)
        conv.close()
        return b"".join(pcm)

    return list(await asyncio.gather(*(one(p) for p in params)))


def engine_parity(model_dir: Path, codec_dir: Path, device: torch.device, *, streams: int,
                  frames: int) -> dict:
    """The whole engine (prompt, batched ticks, sampler, codec): device fp32 vs CPU float64."""
    import numpy as np

    text = "Hello there, this is a test of the streaming model."
    config = EngineConfig(max_streams=streams, max_conversations=streams, lead_s=None,
                          max_frames_per_turn=frames, kv_num_blocks=streams * 8 + 8)
    cases = {"greedy": [SamplingParams(temperature=0)] * streams,
             "sampled": [SamplingParams(seed=21 + i) for i in range(streams)]}
    pcm: dict[str, dict[str, list[bytes]]] = {}
    for name, dev, dtype in (("ref", "cpu", torch.float64), ("dev", device, torch.float32)):
        engine = Engine.from_pretrained(model_dir, codec_dir, device=dev, dtype=dtype, config=config)
        try:
            pcm[name] = {c: asyncio.run(_engine_turns(engine, p, text)) for c, p in cases.items()}
        finally:
            engine.close()
    out: dict = {"streams": streams, "frames_cap": frames, "pcm_lsb": PCM_LSB}
    ok = True
    for case in cases:
        ref_frames = [len(b) // 2 // 1920 for b in pcm["ref"][case]]
        dev_frames = [len(b) // 2 // 1920 for b in pcm["dev"][case]]
        diff = 0
        if ref_frames == dev_frames:
            diff = max(int(np.abs(np.frombuffer(a, "<i2").astype(np.int32)
                                  - np.frombuffer(b, "<i2").astype(np.int32)).max(initial=0))
                       for a, b in zip(pcm["ref"][case], pcm["dev"][case], strict=True))
        case_ok = ref_frames == dev_frames and diff <= PCM_LSB
        ok &= case_ok
        out[case] = {"frames_ref": ref_frames, "frames_dev": dev_frames,
                     "pcm_max_abs_diff_lsb": diff, "ok": case_ok}
    out["ok"] = ok
    return out


def conformance(device: torch.device) -> dict:
    pack = ROOT / "tests" / "fixtures" / "conformance"
    if not (pack / "ref_outputs.npz").is_file():
        return {"skipped": f"conformance pack not found at {pack}", "ok": True}
    out = gpu_check_model.conformance_parity(pack, device)
    out["batched_vs_alone_note"] = "reported, not a failure (as in gpu_check_model.py)"
    return out


# -- phase 2: speed and memory ---------------------------------------------------------------------
def kv_memory(model: MossTTSRealtime, device: torch.device, *, blocks: int) -> dict:
    """KV bytes per row: computed from the config, and measured as the allocation of a pool."""
    cfg = model.config
    bc = cfg.backbone
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    computed = 2 * bc.num_layers * bc.num_kv_heads * bc.head_dim * itemsize
    block_size = EngineConfig().kv_block_size
    rows = EngineConfig().kv_rows_per_conversation
    _free(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
    pool = KVPool(cfg, num_blocks=blocks, block_size=block_size, device=device, dtype=model.dtype)
    if device.type == "cuda":
        _sync(device)
        measured_total = torch.cuda.max_memory_allocated(device) - before
        how = "torch.cuda.max_memory_allocated delta"
    else:
        measured_total = pool.k.nbytes + pool.v.nbytes
        how = "pool tensors' nbytes (CPU)"
    del pool
    _free(device)
    measured = measured_total / (blocks * block_size)
    return {"dtype": str(model.dtype).removeprefix("torch."), "bytes_per_row_computed": computed,
            "bytes_per_row_measured": measured, "measured_by": how, "pool_blocks": blocks,
            "rows_per_conversation": rows, "bytes_per_conversation": measured * rows,
            "mib_per_conversation": round(measured * rows / 2**20, 1)}


def frame_time(model: MossTTSRealtime, *, context: int, frames: int) -> dict:
    r = model_step.time_batch(model, 1, context, frames, warmup=3)
    return {**r, "dtype": str(model.dtype).removeprefix("torch.")}


def engine_n(args: SimpleNamespace, tmp: Path, n: int, step: str, device: torch.device) -> dict:
    """Capacity (unpaced) and paced first audio at N streams, one engine at a time."""
    if device.type == "cuda":
        _free(device)
        torch.cuda.reset_peak_memory_stats(device)
    engine = engine_bench.build_engine(args, tmp, n, paced=False, step=step)
    try:
        asyncio.run(engine_bench.capacity_round(engine, min(n, 4), args.device, seed=1000))
        frames, wall = asyncio.run(engine_bench.capacity_round(engine, n, args.device))
        warmup_s = engine.warmup_s
    finally:
        engine.close()
    del engine
    _free(device)
    engine = engine_bench.build_engine(args, tmp, n, paced=True, step=step)
    try:
        lat = asyncio.run(engine_bench.latency(engine, n, args.stagger, 1))
        lat["engine_underruns"] = engine.stats().underruns
    finally:
        engine.close()
    del engine
    lat.pop("runs", None)
    fps = frames / wall
    out = {"streams": n, "fps": fps, "x_realtime_per_stream": fps / n / FRAME_RATE,
           "frames": frames, "frames_cap": args.frames, "warmup_s": warmup_s, **lat}
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    _free(device)
    return out


def engine_sweep(suite: Suite, args: SimpleNamespace, tmp: Path, step: str,
                 device: torch.device, streams: list[int], reserve_s: float) -> dict:
    rows, skipped, last = [], [], None
    for n in streams:
        # the next N costs about the last one times the growth in streams (ticks get wider)
        need = 0.0 if last is None else last[1] * max(1.0, (n / last[0]) ** 0.5) * 1.5
        if suite.left() - reserve_s < need:
            skipped.append({"streams": n, "skipped": f"time budget ({suite.left():.0f} s left, "
                                                     f"needs ~{need:.0f} s)"})
            continue
        start = time.perf_counter()
        try:
            row = engine_n(args, tmp, n, step, device)
        except Exception as exc:  # e.g. out of memory: keep the rows measured, stop growing N
            traceback.print_exc()
            skipped.append({"streams": n, "error": f"{type(exc).__name__}: {exc}"[:500]})
            _free(device)
            break
        last = (n, time.perf_counter() - start)
        row["seconds"] = round(last[1], 1)
        rows.append(row)
        print(f"  {step} N={n}: {row['fps']:.1f} frames/s, first audio p95 "
              f"{row['ttfa_p95_ms']:.0f} ms, underruns {row['underruns']}", flush=True)
    return {"step": step, "rows": rows, "skipped_streams": skipped}


# -- output -----------------------------------------------------------------------------------------
def print_table(report: dict) -> None:
    print()
    print(f"gpu_suite on {report.get('gpu') or report.get('device')}, torch "
          f"{report.get('torch')}, {report['total_s']} s of {report['budget_s']} s budget")
    print(f"{'phase':<22} {'status':<8} result")
    for name, r in report["phases"].items():
        if "skipped" in r:
            print(f"{name:<22} {'skipped':<8} {r['skipped']}")
            continue
        if "error" in r:
            print(f"{name:<22} {'error':<8} {r['error']}")
            continue
        status = {True: "ok", False: "FAIL"}.get(r.get("ok"), "done")
        print(f"{name:<22} {status:<8} {_summary(name, r)}")
    for name, r in report["phases"].items():
        if name.startswith("engine_") and r.get("rows"):
            print()
            print(f"{name}: {'N':>4} {'frames/s':>9} {'x rt/stream':>11} {'p50 ms':>7} "
                  f"{'p95 ms':>7} {'engine p95':>10} {'underruns':>9} {'peak GiB':>8} {'s':>6}")
            for row in r["rows"]:
                print(f"{'':{len(name) + 1}} {row['streams']:>4} {row['fps']:>9.1f} "
                      f"{row['x_realtime_per_stream']:>11.2f} {row['ttfa_p50_ms']:>7.0f} "
                      f"{row['ttfa_p95_ms']:>7.0f} {row['engine_ttfa_p95_ms']:>10.0f} "
                      f"{row['underruns']:>9} {row.get('peak_gib', '-'):>8} {row['seconds']:>6}")
            for row in r["skipped_streams"]:
                print(f"{'':{len(name) + 1}} {row['streams']:>4} "
                      f"{row.get('skipped') or 'error: ' + row['error']}")
    print(f"parity: {report['parity'].upper() if report['parity'] != 'ok' else 'ok'}")


def _summary(name: str, r: dict) -> str:
    if name == "parity_model":
        return "; ".join(
            f"{m}: hidden {r[m]['step_hidden_max_abs_diff']:.1e}, logits "
            f"{r[m]['logits_rel_diff']:.1e} rel, codes wrong {r[m]['codes_wrong']}/"
            f"{r[m]['codes_compared']} ({r[m]['codes_undecided']} undecided)"
            for m in ("greedy", "sampled"))
    if name == "parity_codec":
        return (f"decode vs cpu f64 {r['decode_max_abs_diff_vs_cpu_f64']:.1e} (atol {r['atol']}); "
                f"streaming rel err {r['streaming_vs_whole_clip']['max_rel_err']:.1e}")
    if name == "parity_conformance":
        return (f"prefill {r['prefill_max_abs_diff']:.1e}, decided codes wrong "
                f"{r['decided_codes_wrong']}, rows differing batched vs alone "
                f"{r['batched_vs_alone_rows_differ']}")
    if name == "parity_engine":
        return "; ".join(f"{c}: frames {r[c]['frames_dev']} vs {r[c]['frames_ref']}, PCM diff "
                         f"{r[c]['pcm_max_abs_diff_lsb']} LSB" for c in ("greedy", "sampled"))
    if name == "frame_time_1_stream":
        return (f"{r['step_ms']:.2f} ms/frame at ctx {r['context']} ({r['dtype']}), "
                f"{r['stream_x_realtime']:.1f}x real time")
    if name == "kv_memory":
        return (f"{r['bytes_per_row_measured']:.0f} B/row measured ({r['bytes_per_row_computed']} "
                f"computed), {r['mib_per_conversation']} MiB per {r['rows_per_conversation']}-row "
                f"conversation")
    if name == "build_speed_models":
        return f"{r['dims']} dims, {r['model_dtype']} model, built in {r['seconds']} s"
    if name.startswith("engine_"):
        return (f"{len(r.get('rows', []))} N measured, {len(r.get('skipped_streams', []))} "
                f"skipped or failed" if "rows" in r else r.get("note", ""))
    return _short(r)


# -- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true",
                   help="tiny dims, N up to 4, short turns: a smoke run of the whole script")
    p.add_argument("--budget-s", type=float, default=450.0)
    p.add_argument("--streams", type=int, nargs="+", default=None,
                   help="engine N (default 1 16 64 128 256; quick: 1 4)")
    p.add_argument("--frames", type=int, default=None, help="frame cap per turn (default 48)")
    p.add_argument("--context", type=int, default=None, help="rows before the timed frames")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu --quick for a smoke run", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    quick = a.quick
    dims = "tiny" if quick or device.type != "cuda" else "real"
    streams = a.streams or ([1, 4] if quick else [1, 16, 64, 128, 256])
    frames = a.frames or (24 if quick else 48)
    context = a.context or (64 if quick else 1024)

    suite = Suite(a.budget_s)
    suite.meta = {"device": str(device), "quick": quick, "dims": dims,
                  "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                  "tf32_cudnn": torch.backends.cudnn.allow_tf32, "streams": streams,
                  "frames_cap": frames}
    watchdog = suite.start_watchdog()
    print(f"gpu_suite: {suite.meta}", flush=True)
    with tempfile.TemporaryDirectory(prefix="moss-gpu-suite-") as tmp_name:
        tmp = Path(tmp_name)
        from core.tiny import write_tiny

        model_dir, codec_dir = write_tiny(tmp)
        # 1. parity (tiny checkpoint)
        small = dict(streams=2, prefill=12, frames=4) if quick else dict(streams=4, prefill=40,
                                                                         frames=24)
        suite.run("parity_model", 5, lambda: model_parity(model_dir, device, **small))
        suite.run("parity_codec", 5, lambda: codec_parity(codec_dir, device,
                                                          frames=24 if quick else 140))
        suite.run("parity_conformance", 5, lambda: conformance(device))
        suite.run("parity_engine", 10, lambda: engine_parity(
            model_dir, codec_dir, device, streams=2 if quick else 4, frames=40 if quick else 80))

        # 2. speed and memory (real dims with random weights; tiny in quick mode)
        args = SimpleNamespace(dims=dims, device=str(device), frames=frames, stagger=0.3 if quick
                               else 1.0, tiny_dirs=(model_dir, codec_dir))

        def build() -> dict:
            if dims == "real":
                engine_bench._prepare_real(args)  # bf16 model, fp32 codec, tiny tokenizer
                args.step_model = args.real_model
            else:
                args.step_model = model_step.random_model(model_step.config_for("tiny"), device,
                                                          torch.float32)
            _sync(device)
            return {"dims": dims, "model_dtype": str(args.step_model.dtype).removeprefix("torch.")}

        built = suite.run("build_speed_models", 60 if dims == "real" else 2, build)
        if "dims" in built:
            suite.run("frame_time_1_stream", 15 if dims == "real" else 2,
                      lambda: frame_time(args.step_model, context=context,
                                         frames=10 if quick else 30))
            suite.run("kv_memory", 5 if dims == "real" else 1,
                      lambda: kv_memory(args.step_model, device, blocks=256))
            steps = ["eager"]
            if device.type == "cpu" and not quick:
                steps.append("compiled")
            for step in steps:
                suite.run(f"engine_{step}", 20 if dims == "real" else 3,
                          lambda step=step: engine_sweep(suite, args, tmp, step, device, streams,
                                                         reserve_s=5.0))
            if device.type == "cuda":
                suite.run("engine_compiled", 0, lambda: {
                    "note": "not available on CUDA: EngineConfig.compile_step is CPU-only"})
            elif quick:
                suite.run("engine_compiled", 0, lambda: {
                    "note": "skipped in --quick (the compile takes longer than the smoke run)"})
        else:
            for name in ("frame_time_1_stream", "kv_memory", "engine_eager"):
                suite.phases[name] = {"skipped": "build_speed_models did not complete"}
        suite.phases["engine_cuda_graphs"] = {"note": "graphs: not implemented"}
        args.real_model = args.real_codec = args.step_model = None
    watchdog.cancel()
    report = suite.report()
    print_table(report)
    print(json.dumps(report, default=str), flush=True)
    return {"ok": 0, "failed": 1}.get(report["parity"], 4)


if __name__ == "__main__":
    sys.exit(main())
