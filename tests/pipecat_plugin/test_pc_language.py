"""The `language` setting of MossTTSService in a real pipeline: a check, never a silent no-op.

The model has no language input (it speaks the text as written), so a language it speaks is
accepted and changes nothing in the engine, and any other one is refused with an ErrorFrame.
"""

from __future__ import annotations

import pytest
from moss_pc_support import llm_turn
from pipecat.frames.frames import ErrorFrame, TTSStoppedFrame, TTSUpdateSettingsFrame
from pipecat.tests.utils import run_test
from pipecat.transcriptions.language import Language

from moss_pipecat import MossTTSService


async def test_unspoken_language_update_is_refused_and_the_old_one_stays(engine) -> None:
    """Prevents: `language="th"` being accepted silently while the model goes on reading the
    text as before; the error names the language and lists the supported ones."""
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(language=Language.EN_US))
    down, up = await run_test(
        tts,
        frames_to_send=[
            *llm_turn("First", " turn."),
            TTSUpdateSettingsFrame(delta=MossTTSService.Settings(language=Language.TH)),
            # the legacy dict form (Pipecat warns it is deprecated, under an "always" filter)
            TTSUpdateSettingsFrame(settings={"language": "nl-NL"}),
            *llm_turn("Second", " turn."),
        ],
    )
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 2, errors
    assert "'th'" in errors[0] and "'nl-NL'" in errors[1]
    assert all("en, es" in e and "only this check" in e for e in errors)
    assert tts._settings.language == "en", "the refused update left the old language"
    assert tts.text_aggregation_language == "en"
    assert sum(isinstance(f, TTSStoppedFrame) for f in down) == 2, "the call keeps speaking"


async def test_spoken_language_update_is_accepted_as_a_check(engine) -> None:
    """Prevents: a migrated pipeline (or a ServiceSwitcher sending a provider-neutral language)
    getting errors for a language the model speaks. It is stored as the model's code, reaches
    Pipecat's sentence splitter, and the model reads the text as before."""
    tts = MossTTSService(engine=engine)
    down, up = await run_test(
        tts,
        frames_to_send=[
            *llm_turn("First", " turn."),
            TTSUpdateSettingsFrame(delta=MossTTSService.Settings(language=Language.CMN_CN)),
            *llm_turn("第二", "句话。"),
        ],
    )
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert tts._settings.language == "zh"
    assert tts.text_aggregation_language == "zh"
    assert sum(isinstance(f, TTSStoppedFrame) for f in down) == 2
    assert tts.conversation.turns[-1].text == "第二句话。", "the text is spoken as written"


async def test_language_can_be_cleared(engine) -> None:
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(language="pt-BR"))
    assert tts._settings.language == "pt"
    await run_test(
        tts, frames_to_send=[TTSUpdateSettingsFrame(delta=MossTTSService.Settings(language=None))]
    )
    assert tts._settings.language is None


def test_constructor_refuses_an_unspoken_language(engine) -> None:
    """Prevents: a misconfigured service starting and only failing (or not) in a live call."""
    with pytest.raises(ValueError, match="does not speak 'yue'"):
        MossTTSService(engine=engine, settings=MossTTSService.Settings(language=Language.YUE))
