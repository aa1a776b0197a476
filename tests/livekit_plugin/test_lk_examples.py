"""The LiveKit example commands a user runs first, run as the user runs them (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], limit_s: float, **env: str) -> subprocess.CompletedProcess[str]:
    """`python ARGS` from the repo root; MOSS_* of the caller's shell left out (defaults apply),
    one CPU thread (the test machine's cores are shared)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MOSS_")}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env={**base, "OMP_NUM_THREADS": "1", **env},
        capture_output=True, text=True, timeout=limit_s,
    )


def test_tts_check_writes_both_clips(tmp_path: Path) -> None:
    """Prevents: a LiveKit check that passes without ever synthesizing (`console --text` never
    calls the TTS): synthesize() and stream() must each write 24 kHz mono audio."""
    out = tmp_path / "out"
    done = _run(["examples/livekit_tts_check.py", "-o", str(out), "--tiny", "--device", "cpu"],
                limit_s=240)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("synthesize", "stream"):
        with wave.open(str(out / f"{name}.wav")) as f:
            assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (24000, 1, 2)
            assert f.getnframes() > 0
        line = next(ln for ln in done.stdout.splitlines() if ln.endswith(f"{name}.wav"))
        assert "s of audio" in line and "first audio after" in line, done.stdout


def test_download_files_offline_says_what_to_do(tmp_path: Path) -> None:
    """Prevents: `download-files` on an offline machine dumping a 300-line traceback instead of
    naming the repo and the `hf download` command, or exiting 0 as if the weights were there."""
    done = _run(["examples/livekit_agent.py", "download-files"], limit_s=120,
                HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    words = " ".join(output.split())  # the CLI wraps lines at the terminal's width
    assert "hf download OpenMOSS-Team/MOSS-TTS-Realtime" in words, output
    assert "network access or a pre-filled HF cache" in words, output
    assert len(output.strip().splitlines()) < 15, output
