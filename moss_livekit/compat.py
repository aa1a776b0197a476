"""Every LiveKit Agents internal this plugin relies on, named in one place and checked at import.

The plugin uses public LiveKit API wherever one serves. The few places where none does are listed
in `INTERNALS` (the member, where the plugin uses it, and why no public hook serves); the rest of
the plugin reaches them only through the accessors below. Importing this module (`moss_livekit`
does) checks that each one still exists on the installed LiveKit Agents and raises an
`ImportError` naming the member and the installed version otherwise, instead of the plugin
quietly losing a feature (a session's conversation, fallback probes) or failing mid-call.

`TESTED_RANGE` is the range of livekit-agents releases the plugin's tests ran against (pyproject
pins the same range; `make test-compat` runs the plugin tests on its oldest and newest release).

Public hooks considered for the session and speech of a stream, and why none serves:
`get_job_context()` raises outside a job (direct use, tests), a job may run several sessions, and
its session (`JobContext._primary_agent_session`) is private too; `RunContext` (session and speech
handle) is handed to function tools only; `tts.TTS` has no session binding; `AgentSession.
current_speech` is the speech playing now, not the (possibly preemptive or queued) one a stream is
created for; the `speech_created` event says a speech exists, not which stream belongs to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

from livekit.agents import _exceptions as lk_exceptions
from livekit.agents import tts as lk_tts
from livekit.agents.tts import fallback_adapter
from livekit.agents.voice import agent_activity

from core import internals
from core.internals import Internal

if TYPE_CHECKING:
    from livekit.agents.voice import AgentSession, SpeechHandle

DISTRIBUTION = "livekit-agents"
TESTED_RANGE = ">=1.7,<1.9"


INTERNALS: tuple[Internal, ...] = (
    Internal(
        agent_activity, "_AgentActivityContextVar", "context variable",
        used_in="tts.py stream creation (via `current_speech`): the session of the reply",
        why="the only link from a TTS stream to the AgentSession whose reply created it (see "
        "the module docstring for the public hooks that do not serve)",
    ),
    Internal(
        agent_activity, "_SpeechHandleContextVar", "context variable",
        used_in="tts.py stream creation (via `current_speech`): the speech of the reply",
        why="the only link from a TTS stream to its SpeechHandle, which tells which playback "
        "report (`playback_finished`) and which end of speech settle the stream's engine turn",
    ),
    Internal(
        agent_activity.AgentActivity, "session", "property",
        used_in="`current_speech`: the session of the activity in the context variable",
        why="public, but on a class reached only through the private context variable",
    ),
    Internal(
        fallback_adapter.FallbackChunkedStream, "_recover_tts_task", "nested coroutine",
        inside="_try_recovery",
        used_in="tts.py stream creation (via `in_fallback_probe`), for synthesize()",
        why="a FallbackAdapter recovery probe synthesizes the reply another TTS is playing and "
        "discards the audio; LiveKit marks it with nothing public, only by the task running "
        "this coroutine, and a probe must never be credited with that playback",
    ),
    Internal(
        fallback_adapter.FallbackSynthesizeStream, "_recover_tts_task", "nested coroutine",
        inside="_try_recovery",
        used_in="tts.py stream creation (via `in_fallback_probe`), for stream()",
        why="as for FallbackChunkedStream",
    ),
    Internal(
        lk_tts.SynthesizeStream, "_mark_started", "method",
        used_in="tts.py SynthesizeStream._run (via `mark_started`)",
        why="the TTFB anchor (text reached the model); LiveKit's own plugins call it, and "
        "nothing public sets it, so without it a stream reports no TTFB",
    ),
    Internal(
        lk_tts.SynthesizeStream, "_input_ch", "init attribute",
        used_in="tts.py SynthesizeStream._run (via `text_until_flush`)",
        why="the text LiveKit pushes into a stream (`push_text`/`flush`/`end_input`) reaches "
        "`_run` only through this channel; every LiveKit TTS plugin reads it",
    ),
    Internal(
        lk_tts.SynthesizeStream, "_FlushSentinel", "class",
        used_in="tts.py SynthesizeStream._run (via `text_until_flush`)",
        why="what `flush()` puts into `_input_ch` (the end of a segment's text)",
    ),
    Internal(
        lk_tts.SynthesizeStream, "_run", "subclass API",
        used_in="tts.py SynthesizeStream._run (override)",
        why="the abstract method a LiveKit TTS plugin implements for streaming synthesis",
    ),
    Internal(
        lk_tts.ChunkedStream, "_run", "subclass API",
        used_in="tts.py ChunkedStream._run (override)",
        why="the abstract method a LiveKit TTS plugin implements for synthesize()",
    ),
    Internal(
        lk_exceptions, "CLIError", "class",
        used_in="engine.py WeightsDownloadError (via `CLIError` here)",
        why="`python agent.py download-files` prints a CLIError as one line and exits 1, any "
        "other error as a traceback; LiveKit exports it from no public module",
    ),
)


class LiveKitInternalsError(ImportError):
    """The installed LiveKit Agents lacks an internal the plugin relies on (see `INTERNALS`)."""


def installed_version() -> str:
    return internals.installed_version(DISTRIBUTION)


def problem(item: Internal) -> str | None:
    """What is wrong with `item` on the installed LiveKit, or None when it is usable."""
    return internals.problem(item)


def check(items: Iterable[Internal] = INTERNALS) -> None:
    """Raise `LiveKitInternalsError` naming every internal missing on the installed LiveKit."""
    internals.check(items, plugin="moss_livekit", distribution=DISTRIBUTION,
                    tested_range=TESTED_RANGE, error=LiveKitInternalsError)


check()


# ----- accessors: the plugin touches the internals above only through these -----------------

CLIError: type[Exception] = lk_exceptions.CLIError


def current_speech() -> tuple[AgentSession | None, SpeechHandle | None]:
    """The session and speech a stream is created for, when created inside a session's reply.

    LiveKit runs each reply in a task that carries its activity and speech handle in context
    variables; a stream opened outside a session (direct use, tests) gets (None, None) and keeps
    its own conversation.
    """
    activity = agent_activity._AgentActivityContextVar.get(None)
    speech = agent_activity._SpeechHandleContextVar.get(None)
    session = activity.session if activity is not None else None
    return session, speech


def in_fallback_probe() -> bool:
    """Whether the running task is a `tts.FallbackAdapter` recovery probe.

    After a TTS of a FallbackAdapter failed, the adapter re-checks it in the background: it
    synthesizes the text of a reply that another TTS is playing and discards the audio. Such a
    probe runs in a task of its own whose coroutine is the adapter's `_recover_tts_task` (for both
    `FallbackSynthesizeStream` and `FallbackChunkedStream`). A stream the adapter serves runs in
    the adapter stream's own task and is not matched.
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop
        return False
    coro = task.get_coro() if task is not None else None
    code = getattr(coro, "cr_code", None)
    frame = getattr(coro, "cr_frame", None)
    if code is None or frame is None or code.co_name != "_recover_tts_task":
        return False
    return frame.f_globals.get("__name__") == fallback_adapter.__name__


def mark_started(stream: lk_tts.SynthesizeStream) -> None:
    """Anchor the stream's TTFB now (the first text reached the model)."""
    stream._mark_started()


async def text_until_flush(stream: lk_tts.SynthesizeStream) -> AsyncIterator[str]:
    """The text pushed into `stream` up to its first `flush()` (or `end_input()`)."""
    async for data in stream._input_ch:
        if isinstance(data, stream._FlushSentinel):
            return
        if data:
            yield data
