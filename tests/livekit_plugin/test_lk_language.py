"""The `language` option of `moss_livekit.TTS`: checked like the Pipecat setting, never ignored.

The model has no language input (it speaks the text as written): a language it speaks is
accepted and changes nothing in the engine, any other one raises `ValueError` at configuration.
"""

from __future__ import annotations

import pytest
from livekit.agents import APIConnectOptions
from livekit.agents.language import LanguageCode

from moss_livekit import TTS

NO_RETRY = APIConnectOptions(max_retry=0, timeout=30.0)


def test_unspoken_language_is_refused_at_construction(engine) -> None:
    """Prevents: `TTS(language="th")` (copied from another plugin's config) starting a worker
    that reads Thai with a model never trained on it; the error names it and lists the rest."""
    with pytest.raises(ValueError, match="does not speak 'th'.*en, es") as info:
        TTS(engine=engine, language="th")
    assert "only this check" in str(info.value)


def test_unspoken_language_update_raises_and_changes_nothing(engine) -> None:
    """Prevents: a refused update leaving half-applied options (the voice of the same call)."""
    plugin = TTS(engine=engine, language=LanguageCode("en-US"))
    with pytest.raises(ValueError, match="does not speak 'yue'"):
        plugin.update_options(language="yue", voice=None)
    assert plugin._opts.language == "en"
    with pytest.raises(TypeError, match="language"):
        plugin.update_options(language=7)  # type: ignore[arg-type]
    plugin.update_options(language=None)
    assert plugin._opts.language is None


async def test_spoken_language_is_accepted_and_the_stream_speaks(engine) -> None:
    """Prevents: users migrating from plugins that take `language=` getting a TypeError, or a
    language the model speaks breaking synthesis."""
    plugin = TTS(engine=engine, language="en-GB")
    plugin.update_options(language=LanguageCode("cmn-Hans-CN"))
    assert plugin._opts.language == "zh"
    stream = plugin.stream(conn_options=NO_RETRY)
    stream.push_text("你好，世界。")
    stream.end_input()
    assert [ev async for ev in stream], "audio comes out"
    await stream.aclose()
    await plugin.aclose()
