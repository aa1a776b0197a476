"""The Pipecat internals the plugin relies on (`moss_pipecat.compat`): present on the installed
Pipecat, and a clear error naming the member and the version when one is gone."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from moss_pc_support import Recorder, llm_turn, run_pipeline, tokens_of, wait_for
from packaging.version import Version
from pipecat.frames.frames import EndFrame, InterruptionFrame, MetricsFrame, TTSAudioRawFrame
from pipecat.metrics.metrics import TTSUsageMetricsData
from pipecat.services.tts_service import TTSService

from moss_pipecat import MossTTSService, compat

ROOT = Path(__file__).resolve().parents[2]
LONG = "One two three. Four five six. Seven eight nine. Ten eleven twelve. Thirteen fourteen."
ENGINE_OVERRIDES = {"lead_s": 0.5}  # paced, so an interruption lands mid-reply


def test_every_internal_used_exists_on_the_installed_pipecat() -> None:
    assert compat.INTERNALS
    assert {i.name: compat.problem(i) for i in compat.INTERNALS} == dict.fromkeys(
        (i.name for i in compat.INTERNALS), None
    )
    compat.check()
    for item in compat.INTERNALS:
        assert item.used_in and item.why  # each entry says where and why


def test_a_missing_method_is_named_with_the_installed_version(monkeypatch) -> None:
    monkeypatch.delattr(TTSService, "_refresh_audio_context")
    with pytest.raises(ImportError) as err:
        compat.check()
    assert isinstance(err.value, compat.PipecatInternalsError)
    message = str(err.value)
    assert "TTSService._refresh_audio_context does not exist" in message
    assert f"pipecat-ai {compat.installed_version()}" in message
    assert compat.TESTED_RANGE in message


def test_an_overridden_method_with_other_parameters_is_refused(monkeypatch) -> None:
    """An override whose base method changed its parameters would be called wrongly (or never)."""

    async def renamed(self, words, context_id=None):  # noqa: ANN001, ANN202
        return None

    monkeypatch.setattr(TTSService, "_add_word_timestamps", renamed)
    with pytest.raises(compat.PipecatInternalsError, match=r"_add_word_timestamps takes \(words"):
        compat.check()


def test_an_attribute_init_no_longer_sets_is_refused(monkeypatch) -> None:
    def bare_init(self, **kwargs):  # noqa: ANN001, ANN202
        pass

    monkeypatch.setattr(TTSService, "__init__", bare_init)
    unset = "_turn_context_id is no longer assigned"
    with pytest.raises(compat.PipecatInternalsError, match=unset):
        compat.check()


def test_importing_the_plugin_fails_clearly_on_a_pipecat_without_a_member() -> None:
    code = (
        "from pipecat.services.tts_service import TTSService\n"
        "del TTSService._record_context_audio_outcome\n"
        "import moss_pipecat\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("moss_pipecat.compat.PipecatInternalsError: "), run.stderr[-2000:]
    assert "TTSService._record_context_audio_outcome does not exist" in last
    assert f"pipecat-ai {compat.installed_version()}" in last


def test_the_pinned_range_is_the_tested_range() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    specs = pyproject["project"]["optional-dependencies"]["pipecat"]
    assert f"pipecat-ai[webrtc,websocket]{compat.TESTED_RANGE}" in specs
    # `make test-compat` runs the same range, and its oldest end is the range's floor
    makefile = (ROOT / "Makefile").read_text()
    assert f"\nPIPECAT_RANGE := {compat.TESTED_RANGE}\n" in makefile
    oldest = re.search(r"^PIPECAT_OLDEST := (\S+)$", makefile, re.M).group(1)
    floor = compat.TESTED_RANGE.split(",")[0].removeprefix(">=")
    assert Version(oldest) == Version(floor)


async def test_an_interrupted_token_reply_reports_its_characters_once(engine) -> None:
    """In TOKEN mode Pipecat reports usage when a reply ends and loses it on an interruption;
    the plugin reports the interrupted reply's characters itself, as the same usage metric
    (processor and model as Pipecat's own) and not again at the reply's end."""
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(seed=3))
    rec = Recorder()
    tokens = tokens_of(LONG)

    async def driver(worker) -> None:
        await worker.queue_frames(llm_turn(*tokens)[:-1])  # the LLM is still streaming
        await wait_for(lambda: rec.frames(TTSAudioRawFrame))
        first = tts._latest
        await worker.queue_frame(InterruptionFrame())
        await wait_for(lambda: first.done.is_set() and first.cancelled)
        await worker.queue_frames(llm_turn("Sure.", " Go", " ahead."))
        await wait_for(lambda: tts._latest is not first and tts._latest.done.is_set())
        await worker.queue_frame(EndFrame())

    await run_pipeline([tts, rec], driver)

    usage = [d for f in rec.frames(MetricsFrame) for d in f.data
             if isinstance(d, TTSUsageMetricsData)]
    assert [u.value for u in usage] == [len(LONG), len("Sure. Go ahead.")]
    assert {(u.processor, u.model) for u in usage} == {(tts.name, "MOSS-TTS-Realtime")}
