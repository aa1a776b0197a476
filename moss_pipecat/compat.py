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

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from pipecat.services.ai_service import AIService
from pipecat.services.tts_service import TTSService

DISTRIBUTION = "pipecat-ai"
TESTED_RANGE = ">=1.13,<1.15"


@dataclass(frozen=True, slots=True)
class Internal:
    """One underscore-named Pipecat member the plugin uses.

    kind: "method" or "property" (looked up on `owner`), "init attribute" (an instance attribute
        `owner.__init__` assigns; checked in its code, since no instance exists at import), or
        "subclass API" (underscore-named, but Pipecat documents it for services to override).
    params: for a method the plugin overrides or calls, the leading parameters (after self) it
        relies on, in order.
    """

    owner: type
    name: str
    kind: str
    used_in: str
    why: str
    params: tuple[str, ...] = ()

    @property
    def qualname(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"


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
        AIService, "_settings", "subclass API",
        used_in="tts.py MossTTSService (voice, sampling, language, model of the current settings)",
        why="documented by Pipecat as the store a service's `Settings` live in (its single "
        "source of truth, also for the model name in metrics)",
    ),
)


class PipecatInternalsError(ImportError):
    """The installed Pipecat lacks an internal the plugin relies on (see `INTERNALS`)."""


def installed_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # pragma: no cover - a source checkout of Pipecat
        import pipecat

        return str(getattr(pipecat, "__version__", "unknown"))


def _init_assigns(owner: type, name: str) -> bool:
    init = getattr(owner.__init__, "__code__", None)
    return init is not None and name in init.co_names


def problem(item: Internal) -> str | None:
    """What is wrong with `item` on the installed Pipecat, or None when it is usable."""
    if item.kind == "init attribute" or (item.kind == "subclass API" and item.name == "_settings"):
        if _init_assigns(item.owner, item.name):
            return None
        return f"{item.qualname} is no longer assigned by {item.owner.__qualname__}.__init__"
    member = inspect.getattr_static(item.owner, item.name, None)
    if member is None:
        return f"{item.qualname} does not exist"
    if item.kind == "property" and not isinstance(member, property):
        return f"{item.qualname} is no longer a property"
    if item.params:
        func = member.fget if isinstance(member, property) else member
        try:
            names = list(inspect.signature(func).parameters)[1:]  # after self
        except (TypeError, ValueError):
            return f"{item.qualname} is no longer a function"
        if tuple(names[: len(item.params)]) != item.params:
            return (
                f"{item.qualname} takes ({', '.join(names)}); the plugin relies on "
                f"({', '.join(item.params)})"
            )
    return None


def check(internals: Iterable[Internal] = INTERNALS) -> None:
    """Raise `PipecatInternalsError` naming every internal missing on the installed Pipecat."""
    problems = [p for p in map(problem, internals) if p is not None]
    if problems:
        raise PipecatInternalsError(
            f"moss_pipecat cannot run on {DISTRIBUTION} {installed_version()}: "
            + "; ".join(problems)
            + f". It is tested with {DISTRIBUTION}{TESTED_RANGE}; install a release in that "
            "range (see moss_pipecat/compat.py for what each member is used for)."
        )


check()


# ----- accessors: the plugin touches the internals above only through these -----------------


def turn_context_id(service: TTSService) -> str | None:
    """The context id of the LLM response or `TTSSpeakFrame` being spoken, if any."""
    return service._turn_context_id


def refresh_audio_context(service: TTSService, context_id: str) -> None:
    """Reset the idle timeout of an open audio context (nothing is appended to it)."""
    service._refresh_audio_context(context_id)
