"""Every Pipecat internal this plugin relies on, named in one place and checked at import.

`MossTTSService` uses public Pipecat API wherever one serves. The few places where none does are
listed in `INTERNALS` (the member, where the plugin uses it, and why no public hook serves); the
rest of the plugin reaches them only through the accessors below or by overriding them. Importing
this module (`moss_pipecat` does) checks that each one still exists on the installed Pipecat, with
the signature the plugin calls, and raises an `ImportError` naming the member and the installed
version otherwise, instead of failing (or, for an override, silently never being called) in the
middle of a call.

`TESTED_RANGE` is the range of Pipecat releases the plugin's tests ran against (pyproject pins the
same range; `make test-compat` runs the plugin tests on its oldest and newest release).
"""

from __future__ import annotations

from collections.abc import Iterable

from pipecat.services.ai_service import AIService
from pipecat.services.tts_service import TTSService

from core import internals
from core.internals import Internal

DISTRIBUTION = "pipecat-ai"
TESTED_RANGE = ">=1.13,<1.15"


INTERNALS: tuple[Internal, ...] = (
    Internal(
        TTSService, "_turn_context_id", "init attribute",
        used_in="tts.py MossTTSService.run_tts (via `turn_context_id`)",
        why="the only record of the LLM response or TTSSpeakFrame being spoken: text for any "
        "other context is a bare TextFrame whose turn nothing will end, so run_tts ends it. "
        "`on_turn_context_created` announces a turn, but Pipecat resets and restores the id "
        "itself (a TTSSpeakFrame inside an LLM turn, interruptions) with no public hook, and "
        "`get_active_audio_context_id()` prefers the context playing now",
    ),
    Internal(
        TTSService, "_refresh_audio_context", "method", params=("context_id",),
        used_in="tts.py MossTTSService._keepalive (via `refresh_audio_context`)",
        why="keeps an audio context open while the LLM pauses inside a reply (a tool call): "
        "Pipecat closes a context after `stop_frame_timeout_s` without audio, and appending to "
        "it, the only public way to reset that timer, would play the appended frame",
    ),
    Internal(
        TTSService, "_record_context_audio_outcome", "method",
        params=("context_id", "received_audio"),
        used_in="tts.py MossTTSService._record_context_audio_outcome (override, calls super)",
        why="a reply that failed with an error already reported (engine full, bad voice) must "
        "not also count as a silent provider: Pipecat writes a service off after a few silent "
        "contexts and reports each one; `on_audio_context_completed` runs after that decision",
    ),
    Internal(
        TTSService, "_add_word_timestamps", "method",
        params=("word_times", "context_id", "includes_inter_frame_spaces"),
        used_in="tts.py MossTTSService._add_word_timestamps (override, calls super)",
        why="the one point where word times are handled in playback order (after the audio "
        "before the word was pushed), so an LLM pause measured by the playback clock can be "
        "added; the public `add_word_timestamps` runs when the words are queued, before that",
    ),
    Internal(
        AIService, "_update_settings", "subclass API", params=("delta",),
        used_in="tts.py MossTTSService._update_settings (override, calls super)",
        why="documented by Pipecat as the method services override to validate and apply "
        "`TTSUpdateSettingsFrame` deltas",
    ),
    Internal(
        AIService, "_settings", "init attribute",
        used_in="tts.py MossTTSService (voice, sampling, language, model of the current settings)",
        why="documented by Pipecat as the store a service's `Settings` live in (its single "
        "source of truth, also for the model name in metrics)",
    ),
)


class PipecatInternalsError(ImportError):
    """The installed Pipecat lacks an internal the plugin relies on (see `INTERNALS`)."""


def installed_version() -> str:
    return internals.installed_version(DISTRIBUTION)


def problem(item: Internal) -> str | None:
    """What is wrong with `item` on the installed Pipecat, or None when it is usable."""
    return internals.problem(item)


def check(items: Iterable[Internal] = INTERNALS) -> None:
    """Raise `PipecatInternalsError` naming every internal missing on the installed Pipecat."""
    internals.check(items, plugin="moss_pipecat", distribution=DISTRIBUTION,
                    tested_range=TESTED_RANGE, error=PipecatInternalsError)


check()


# ----- accessors: the plugin touches the internals above only through these -----------------


def turn_context_id(service: TTSService) -> str | None:
    """The context id of the LLM response or `TTSSpeakFrame` being spoken, if any."""
    return service._turn_context_id


def refresh_audio_context(service: TTSService, context_id: str) -> None:
    """Reset the idle timeout of an open audio context (nothing is appended to it)."""
    service._refresh_audio_context(context_id)
