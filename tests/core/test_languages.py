"""`core.languages`: the one list of languages both plugins accept, and its code normalisation."""

from __future__ import annotations

import pytest

from core.languages import SUPPORTED_LANGUAGES, check_language


def test_the_list_is_the_model_cards_twenty() -> None:
    """Prevents: the list drifting from the upstream card (20 languages, Hebrew included)."""
    assert sorted(SUPPORTED_LANGUAGES) == [
        "ar", "cs", "da", "de", "el", "en", "es", "fa", "fr", "he",
        "hu", "it", "ja", "ko", "pl", "pt", "ru", "sv", "tr", "zh",
    ]


@pytest.mark.parametrize(
    ("given", "code"),
    [
        ("en", "en"),
        ("en-US", "en"),
        ("EN_gb", "en"),
        (" pt-BR ", "pt"),
        ("es-419", "es"),
        ("zh", "zh"),
        ("zh-Hant-TW", "zh"),
        ("cmn", "zh"),
        ("cmn-Hans-CN", "zh"),
        ("zh-cmn-Hans-CN", "zh"),
        ("iw-IL", "he"),
        ("he", "he"),
        ("ja-JP", "ja"),
    ],
)
def test_bcp47_tags_of_spoken_languages_map_to_the_models_code(given: str, code: str) -> None:
    """Prevents: a user's regional tag ("en-US", Google's "cmn-Hans-CN") being refused."""
    assert check_language(given) == code


def test_framework_language_types_are_accepted() -> None:
    """Prevents: Pipecat's `Language` enum or LiveKit's `LanguageCode` failing a str check."""
    from livekit.agents.language import LanguageCode
    from pipecat.transcriptions.language import Language

    assert check_language(Language.EN_US) == "en"
    assert check_language(Language.CMN_CN) == "zh"
    assert check_language(LanguageCode("german")) == "de"
    assert type(check_language(Language.FR)) is str


def test_none_means_no_language() -> None:
    assert check_language(None) is None


@pytest.mark.parametrize(
    "given", ["th", "yue", "zh-yue", "nl-NL", "zh-CN-sichuan", "english", "auto", "", "e", "en-US-x-y"]
)
def test_unspoken_languages_are_refused_with_the_list(given: str) -> None:
    """Prevents: a language the model was not trained on (Cantonese, a dialect, Thai) passing
    silently; the message names the input, lists what is spoken and says it is only a check."""
    with pytest.raises(ValueError) as info:
        check_language(given)
    message = str(info.value)
    assert repr(given) in message
    assert "ar, cs, da, de, el, en, es, fa, fr, he, hu, it, ja, ko, pl, pt, ru, sv, tr, zh" in message
    assert "only this check" in message


def test_non_strings_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="language"):
        check_language(3)  # type: ignore[arg-type]
