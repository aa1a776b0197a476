"""`moss-tts say`: arguments checked before the load, one-line errors, exit codes, progress."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from core.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST_S = 3.0  # a user error must not wait for torch, the hub or the weights


def _wav(path: Path, seconds: float, amplitude: float = 0.3, rate: int = 24000) -> Path:
    """Voiced-looking test audio (two tones plus a little noise)."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(0).normal(0, 0.02, t.shape)
    x = amplitude * (np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 530 * t)) + noise
    sf.write(str(path), x.astype(np.float32), rate)
    return path


def _cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `python -m core.cli` as a user would; returns the process and its wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "core.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    return proc, time.monotonic() - started


def _one_error_line(err: str) -> str:
    """The stderr contract for a user error: exactly one line, no traceback."""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith("moss-tts: error: ") and "Traceback" not in err
    return lines[0]


def _bad_voice(kind: str, tmp_path: Path) -> Path:
    """Each way a --voice can be unusable: absent, not audio, too short, silent."""
    if kind == "missing":
        return tmp_path / "nope.wav"
    if kind == "text":
        (tmp_path / "notes.wav").write_text("not audio at all\n")
        return tmp_path / "notes.wav"
    if kind == "short":
        return _wav(tmp_path / "short.wav", 0.2)
    if kind == "silent":
        sf.write(str(tmp_path / "silent.wav"), np.zeros(48000, np.float32), 24000)
        return tmp_path / "silent.wav"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "says"),
    [("missing", "no such file"), ("text", "cannot decode"), ("short", "too short: 0.20 s"),
     ("silent", "silent")],
)
def test_bad_voice_fails_in_seconds_with_one_line(tmp_path: Path, kind: str, says: str):
    """Prevents a typo'd or unusable --voice from surfacing only after a minutes-long model load
    (or as a traceback): one line, exit 2, well under FAST_S, and no output file written."""
    voice = _bad_voice(kind, tmp_path)
    out = tmp_path / "out.wav"
    proc, elapsed = _cli("say", "Hello there.", "-o", str(out), "--voice", str(voice))
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert f"--voice {voice}" in line and says in line
    assert proc.stdout == "" and not out.exists()
    assert elapsed < FAST_S, f"bad voice took {elapsed:.2f} s"


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_output_fails_in_seconds_with_one_line(tmp_path: Path, where: str):
    """Prevents generating a whole utterance and then losing it to an -o that cannot be
    written: the path is probed before anything loads."""
    if where == "under_a_file":
        (tmp_path / "file.txt").write_text("x")
        out, says = tmp_path / "file.txt" / "out.wav", "is not a directory"
    else:
        if not Path("/proc").is_dir():
            pytest.skip("no /proc on this system")
        out, says = Path("/proc/x.wav"), "cannot write in /proc"
    proc, elapsed = _cli("say", "Hello there.", "-o", str(out))
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert f"-o {out}" in line and says in line
    assert elapsed < FAST_S, f"bad output took {elapsed:.2f} s"


@pytest.mark.parametrize("name", ["out.mp3", "out", "adir.wav"])
def test_output_must_be_a_wav_file(tmp_path: Path, capsys, name: str):
    """Prevents writing WAV bytes under another extension, or failing late on a directory."""
    (tmp_path / "adir.wav").mkdir()
    assert main(["say", "Hi.", "-o", str(tmp_path / name), "--tiny"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "must be a .wav file" in line or "is a directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.wav"]  # no probe left behind


def test_swapped_model_and_codec_get_the_hint(tiny_dirs, tmp_path: Path, capsys):
    """Prevents a missing-field error from the wrong config parser when the user simply swapped
    the two flags: say exactly that, for either flag."""
    model_dir, codec_dir = tiny_dirs
    out = str(tmp_path / "out.wav")
    assert main(["say", "Hi.", "-o", out, "--model", str(codec_dir),
                 "--codec", str(model_dir)]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        "moss-tts: error: --model points at a codec checkpoint; did you swap --model and --codec?")
    assert main(["say", "Hi.", "-o", out, "--model", str(model_dir),
                 "--codec", str(model_dir)]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        "moss-tts: error: --codec points at a model checkpoint; did you swap --model and --codec?")


@pytest.mark.parametrize("flag", ["--model", "--codec"])
def test_tiny_with_model_or_codec_is_refused(tiny_dirs, tmp_path: Path, capsys, flag: str):
    """Prevents `--tiny --model X` from silently ignoring X and speaking random noise."""
    model_dir, _ = tiny_dirs
    assert main(["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--tiny", flag, str(model_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--tiny" in line and "--model/--codec" in line


def test_not_a_checkpoint_is_named_before_loading(tiny_dirs, tmp_path: Path, capsys):
    """Prevents pointing --model at the wrong directory (no config, no weights, another model
    type) or at a malformed id from costing a load: each names the flag and what is wrong."""
    model_dir, codec_dir = tiny_dirs
    out = str(tmp_path / "o.wav")
    cases = {}
    empty = tmp_path / "empty"
    empty.mkdir()
    cases[str(empty)] = "missing config.json"
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(model_dir / "config.json", no_weights / "config.json")
    cases[str(no_weights)] = "no model.safetensors"
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps(dict(config, model_type="qwen3")))
    cases[str(qwen)] = "model_type 'qwen3'"
    cases["a/b/c"] = "neither an existing directory nor a hub id"
    for model, says in cases.items():
        assert main(["say", "Hi.", "-o", out, "--model", model, "--codec", str(codec_dir)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith("moss-tts: error: --model") and says in line, line


def test_bad_device_is_refused_before_loading(tiny_dirs, tmp_path: Path, capsys, monkeypatch):
    """Prevents a nonsense --device (or cuda on a CPU-only torch) from failing after the load."""
    from core.engine import Engine

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load with a bad --device")

    monkeypatch.setattr(Engine, "from_pretrained", no_load)
    model_dir, codec_dir = tiny_dirs
    base = ["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--model", str(model_dir),
            "--codec", str(codec_dir)]
    assert main([*base, "--device", "gpu0"]) == 2
    assert "--device" in _one_error_line(capsys.readouterr().err)
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) == 2
        assert "sees no CUDA device" in _one_error_line(capsys.readouterr().err)
    assert main([*base, "--device", "cpu", "--temperature", "-1"]) == 2
    assert "temperature" in _one_error_line(capsys.readouterr().err)


def test_load_time_checkpoint_error_is_one_line(tiny_dirs, tmp_path: Path, capsys):
    """Prevents a corrupt weights file (found only while loading) from printing a traceback:
    one error line after the progress lines, exit 2; --debug shows the traceback."""
    model_dir, codec_dir = tiny_dirs
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    args = ["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--model", str(bad),
            "--codec", str(codec_dir), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("moss-tts: error: cannot read")
    assert "Traceback" not in err and err.splitlines()[0].startswith("moss-tts: loading model")
    assert main([*args, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unexpected_error_exits_1_with_one_line(tiny_dirs, tmp_path: Path, capsys, monkeypatch):
    """Prevents a bug from being reported as a user mistake (exit 2) or as a wall of traceback
    by default; --debug still gives the traceback."""
    from core.engine import Engine

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(Engine, "from_pretrained", boom)
    model_dir, codec_dir = tiny_dirs
    args = ["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--model", str(model_dir),
            "--codec", str(codec_dir), "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "moss-tts: error: unexpected RuntimeError: boom / second line "
        "(rerun with --debug for the traceback)")
    assert "Traceback" not in err
    assert main([*args, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_hub_id_not_cached_offline_says_hf_download(tmp_path: Path, capsys, monkeypatch):
    """Prevents pointing users at `huggingface-cli`, which current huggingface_hub no longer
    ships: a hub id missing from an offline cache says `hf download <id>`, in one line."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--model", "acme/not-there",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("moss-tts: fetching model acme/not-there")
    line = err.splitlines()[-1]
    assert line.startswith("moss-tts: error: --model:") and "`hf download acme/not-there`" in line
    assert "huggingface-cli" not in err and "Traceback" not in err


def test_usage_errors_are_one_line(tmp_path: Path, capsys):
    """Prevents argparse's multi-line usage dump and the empty-text case from breaking the
    one-line, exit-2 contract."""
    assert main(["say"]) == 2
    assert "required" in _one_error_line(capsys.readouterr().err)
    assert main(["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--max-frames", "x"]) == 2
    assert "--max-frames" in _one_error_line(capsys.readouterr().err)
    assert main(["say", "   ", "-o", str(tmp_path / "o.wav"), "--tiny"]) == 2
    assert "nothing to say" in _one_error_line(capsys.readouterr().err)
    voice = _wav(tmp_path / "ref.wav", 2.0)
    assert main(["say", "Hi.", "-o", str(voice), "--voice", str(voice), "--tiny"]) == 2
    assert "overwrite the --voice" in _one_error_line(capsys.readouterr().err)
    assert sf.info(str(voice)).duration == pytest.approx(2.0)


def test_tiny_says_into_a_wav_with_progress(tmp_path: Path, capsys):
    """`moss-tts say ... --tiny` must still work end to end: a 24 kHz WAV, progress on stderr
    (what loads, how long it took) and the summary alone on stdout."""
    out = tmp_path / "out.wav"
    assert main(["say", "Hello there. How are you?", "-o", str(out), "--tiny",
                 "--device", "cpu", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    audio, rate = sf.read(str(out))
    assert rate == 24000 and audio.size > 0
    assert captured.out.count("\n") == 1 and captured.out.startswith(f"wrote {out}: ")
    assert "moss-tts: loading tiny random model and codec on cpu ..." in captured.err
    assert "moss-tts: model and codec loaded in " in captured.err


def test_voice_and_local_dirs_into_a_new_directory(tiny_dirs, tmp_path: Path, capsys):
    """A valid voice passes the early check and the engine's; a missing output directory is
    created (the probe accepted its existing ancestor)."""
    model_dir, codec_dir = tiny_dirs
    voice = _wav(tmp_path / "ref.wav", 1.5)
    out = tmp_path / "new" / "sub" / "out.wav"
    assert main(["say", "Hello there.", "-o", str(out), "--voice", str(voice), "--model",
                 str(model_dir), "--codec", str(codec_dir), "--device", "cpu", "--seed", "2"]) == 0
    err = capsys.readouterr().err
    assert f"loading model {model_dir} and codec {codec_dir} on cpu" in err
    assert f"voice {voice} encoded in" in err and "error" not in err
    assert sf.info(str(out)).frames > 0
