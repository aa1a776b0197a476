"""The languages MOSS-TTS-Realtime speaks, and one check of language codes against them.

The model has no language input: upstream's realtime API takes text (and audio context) only,
unlike MOSS-TTS-v1.5's language tags, so it speaks the text in the language it is written in.
A plugin's `language` setting is therefore a check, not a switch: a language the model was
trained on passes and changes nothing in the engine; any other one is refused with the list,
so asking for Thai fails at configuration time instead of producing Thai read by a model that
was never trained on it. Both plugins use this module, so they accept and refuse the same codes.

Source: OpenMOSS/MOSS-TTS `docs/moss_tts_realtime_model_card.md` §1.4 at commit 58b20a0 ("follows
the original MOSS-TTS family language set and supports 20 languages"; its table shows 19 and
omits Hebrew), and the Hugging Face model card of OpenMOSS-Team/MOSS-TTS-Realtime (README.md
`language:` metadata, revision d6944f1), which lists all 20, Hebrew included.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

SUPPORTED_LANGUAGES: Mapping[str, str] = MappingProxyType({
    "ar": "Arabic",
    "cs": "Czech",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "fa": "Persian",
    "fr": "French",
    "he": "Hebrew",
    "hu": "Hungarian",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "sv": "Swedish",
    "tr": "Turkish",
    "zh": "Chinese",
})

# Codes other services emit for a supported language: "cmn" (Mandarin, e.g. Google STT's
# "cmn-Hans-CN", Pipecat's Language.CMN) and "iw" (the withdrawn Hebrew code Java/Android use).
_ALIASES = {"cmn": "zh", "iw": "he"}

# BCP-47 language [-extlang] [-script] [-region]; variants ("zh-CN-sichuan") are dialects the
# model was not trained on, so they do not match and are refused.
_TAG = re.compile(r"([a-z]{2,3})(?:-([a-z]{3}))?(?:-[a-z]{4})?(?:-(?:[a-z]{2}|[0-9]{3}))?")


def check_language(language: str | None) -> str | None:
    """The model's code for `language` ("zh" for "cmn-Hans-CN"); None (no language) stays None.

    Accepts BCP-47 tags with optional script and region ("en", "en-US", "zh-Hant-TW", "pt_BR")
    and Pipecat `Language` / LiveKit `LanguageCode` values (both are `str`).

    Raises:
        ValueError: the model does not speak it (Cantonese "yue" and dialect variants included);
            the message lists the supported codes and says the setting is only a check.
        TypeError: `language` is neither a string nor None.
    """
    if language is None:
        return None
    if not isinstance(language, str):
        raise TypeError(f"language must be a code such as 'en', or None; got {language!r}")
    match = _TAG.fullmatch(language.strip().lower().replace("_", "-"))
    code = (match.group(2) or match.group(1)) if match else ""
    code = _ALIASES.get(code, code)
    if code not in SUPPORTED_LANGUAGES:
        raise ValueError(
            f"MOSS-TTS-Realtime does not speak {str(language)!r}; it speaks "
            f"{', '.join(SUPPORTED_LANGUAGES)} (region and script subtags are fine, dialects are "
            "not). The language setting is only this check: the model has no language switch "
            "and speaks the text in the language it is written in."
        )
    return code
