"""Smoke run of benchmarks/gpu_suite.py in its quick CPU mode (tiny dims, N 1 and 4).

The suite is run on a GPU rarely and by one shot, so a script that breaks on the CPU would waste
that run: this runs it end to end here. CPU against CPU float64 is trivially close; what this
pins is that every phase runs and reports its numbers in the final JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARITY = ("parity_model", "parity_codec", "parity_conformance", "parity_engine")


def test_quick_cpu_run_reports_every_phase() -> None:
    """Prevents a GPU suite that crashes, hangs or drops a phase: the quick CPU mode must exit 0
    within the timeout, print one JSON line with every phase, and pass each parity check."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--quick",
         "--budget-s", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["bench"] == "gpu_suite" and report["device"] == "cpu" and report["quick"]
    assert report["gpu"] is None and report["torch"]
    assert report["parity"] == "ok" and report["parity_ok"] is True
    assert report["total_s"] < report["budget_s"]
    phases = report["phases"]
    for name in PARITY:
        assert phases[name]["ok"] is True, (name, phases[name])
    model = phases["parity_model"]
    for mode in ("greedy", "sampled"):
        assert model[mode]["codes_compared"] > 0 and model[mode]["codes_wrong"] == 0
        assert model[mode]["step_hidden_max_abs_diff"] < model["tol"]
    assert phases["parity_codec"]["decode_max_abs_diff_vs_cpu_f64"] < phases["parity_codec"]["atol"]
    for case in ("greedy", "sampled"):
        engine = phases["parity_engine"][case]
        assert engine["frames_ref"] == engine["frames_dev"] and min(engine["frames_ref"]) > 0
    assert phases["frame_time_1_stream"]["step_ms"] > 0
    kv = phases["kv_memory"]
    assert kv["bytes_per_row_measured"] == kv["bytes_per_row_computed"] == 512  # tiny fp32
    rows = phases["engine_eager"]["rows"]
    assert [r["streams"] for r in rows] == [1, 4]
    for r in rows:
        assert r["fps"] > 0 and r["ttfa_p95_ms"] > 0 and r["frames"] == 24 * r["streams"]
    assert "not implemented" in phases["engine_cuda_graphs"]["note"]
    assert "skipped" in phases["engine_compiled"]["note"]
