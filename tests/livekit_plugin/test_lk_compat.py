"""The LiveKit Agents internals the plugin relies on (`moss_livekit.compat`): present on the
installed LiveKit, and a clear error naming the member and the version when one is gone."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from livekit.agents import tts as lk_tts
from livekit.agents.tts import fallback_adapter
from livekit.agents.voice import agent_activity
from packaging.version import Version

from moss_livekit import WeightsDownloadError, compat

ROOT = Path(__file__).resolve().parents[2]


def test_every_internal_used_exists_on_the_installed_livekit() -> None:
    assert compat.INTERNALS
    assert {i.qualname: compat.problem(i) for i in compat.INTERNALS} == dict.fromkeys(
        (i.qualname for i in compat.INTERNALS), None
    )
    compat.check()
    for item in compat.INTERNALS:
        assert item.used_in and item.why  # each entry says where and why


def test_a_missing_method_is_named_with_the_installed_version(monkeypatch) -> None:
    monkeypatch.delattr(lk_tts.SynthesizeStream, "_mark_started")
    with pytest.raises(ImportError) as err:
        compat.check()
    assert isinstance(err.value, compat.LiveKitInternalsError)
    message = str(err.value)
    assert "livekit.agents.tts.tts.SynthesizeStream._mark_started does not exist" in message
    assert f"livekit-agents {compat.installed_version()}" in message
    assert compat.TESTED_RANGE in message


def test_a_missing_context_variable_is_refused(monkeypatch) -> None:
    monkeypatch.delattr(agent_activity, "_SpeechHandleContextVar")
    missing = "_SpeechHandleContextVar does not exist"
    with pytest.raises(compat.LiveKitInternalsError, match=missing):
        compat.check()


def test_a_renamed_fallback_probe_coroutine_is_refused(monkeypatch) -> None:
    """Recognising a FallbackAdapter probe depends on its coroutine's name, inside a method."""

    def _try_recovery(self, tts):  # noqa: ANN001, ANN202
        async def _renamed_task() -> None:
            pass

    monkeypatch.setattr(fallback_adapter.FallbackSynthesizeStream, "_try_recovery", _try_recovery)
    with pytest.raises(compat.LiveKitInternalsError) as err:
        compat.check()
    assert "FallbackSynthesizeStream._try_recovery.<locals>._recover_tts_task" in str(err.value)
    assert "FallbackChunkedStream" not in str(err.value)  # only what is actually missing


def test_an_attribute_init_no_longer_sets_is_refused(monkeypatch) -> None:
    def bare_init(self, **kwargs):  # noqa: ANN001, ANN202
        pass

    monkeypatch.setattr(lk_tts.SynthesizeStream, "__init__", bare_init)
    with pytest.raises(compat.LiveKitInternalsError, match="_input_ch is no longer assigned"):
        compat.check()


def test_importing_the_plugin_fails_clearly_on_a_livekit_without_a_member() -> None:
    code = (
        "from livekit.agents.voice import agent_activity\n"
        "del agent_activity._AgentActivityContextVar\n"
        "import moss_livekit\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("moss_livekit.compat.LiveKitInternalsError: "), run.stderr[-2000:]
    assert "agent_activity._AgentActivityContextVar does not exist" in last
    assert f"livekit-agents {compat.installed_version()}" in last


def test_the_pinned_range_is_the_tested_range() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    specs = pyproject["project"]["optional-dependencies"]["livekit"]
    assert f"livekit-agents{compat.TESTED_RANGE}" in specs
    # `make test-compat` runs the same range, and its oldest end is the range's floor
    makefile = (ROOT / "Makefile").read_text()
    assert f"\nLIVEKIT_RANGE := {compat.TESTED_RANGE}\n" in makefile
    oldest = re.search(r"^LIVEKIT_OLDEST := (\S+)$", makefile, re.M).group(1)
    floor = compat.TESTED_RANGE.split(",")[0].removeprefix(">=")
    assert Version(oldest) == Version(floor)


async def test_outside_a_session_reply_there_is_no_session_and_no_probe() -> None:
    assert compat.current_speech() == (None, None)
    assert not compat.in_fallback_probe()

    async def in_own_task() -> bool:
        return compat.in_fallback_probe()

    assert not await asyncio.create_task(in_own_task())


def test_the_weights_error_is_the_one_livekit_prints_plainly() -> None:
    from livekit.agents.cli import _legacy  # the `python agent.py download-files` path

    assert issubclass(WeightsDownloadError, compat.CLIError)
    assert compat.CLIError is _legacy.CLIError
