"""Child process of `test_lk_processes.py`: one LiveKit `AgentSession` (as one job process of a
LiveKit worker would run it) speaking through `moss_livekit.TTS(engine=RemoteEngine(url))`.

    python lk_process_job.py URL TOKEN NAME OUT_JSON

The scenario: one reply, then a line `{"event": "ready", ...}` on stdout and a wait for `go` on
stdin (so that both children hold their conversation open on the server at the same time), then
a second reply, a third one interrupted while it plays, and a fourth. Everything observed goes to
OUT_JSON (also when the scenario fails: `errors` says why); the exit status is 0 when it got that
far. Every text names NAME, so a turn of another process in this conversation stands out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

FRAME_S = 0.08
HEARD_S = 1.2  # the interruption comes after this much of the third reply was played
DEADLINE_S = 60.0  # the whole scenario, whatever happens (the parent kills us later anyway)


def script(name: str) -> tuple[list[str], list[str]]:
    """(user inputs, scripted LLM replies) of the child called `name`."""
    users = [
        f"Hello there, this is {name}.",
        f"Can you help {name}?",
        f"Tell {name} a story.",
        f"Never mind, says {name}.",
    ]
    replies = [
        f"Hi {name}! Nice to meet you.",
        f"Sure {name}, happy to help.",
        f"Let me tell you, {name}, a rather long story about a lighthouse keeper who counted "
        "ships every night, wrote their names in a book, and never once missed a single evening "
        "of work.",
        f"Okay {name}, moving on.",
    ]
    return users, replies


class _ErrorLog(logging.Handler):
    """Keeps every ERROR record logged in this process (LiveKit logs failed TTS attempts)."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(level=logging.ERROR)
        self._into = into

    def emit(self, record: logging.LogRecord) -> None:
        self._into.append(f"log {record.name}: {record.getMessage()}")


async def _read_go(reader: asyncio.StreamReader) -> None:
    line = await reader.readline()
    if line.strip() != b"go":
        raise RuntimeError(f"expected 'go' from the parent, got {line!r}")


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def run_job(url: str, token: str, name: str, result: dict[str, Any]) -> None:
    from lk_kit import assistant_messages, make_session, new_agent, wait_until

    from core.remote import RemoteEngine
    from moss_livekit import TTS

    users, replies = script(name)
    errors: list[str] = result["errors"]
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    remote = RemoteEngine(url, token=token)
    plugin = TTS(engine=remote)
    session, _, audio, _ = make_session(plugin, replies, speed=1.0, token_delay_s=0.06)
    session.on("error", lambda ev: errors.append(f"session error event: {ev.error!r}"))
    plugin.on("error", lambda ev: errors.append(f"tts error event: {ev.error!r}"))
    windows: list[list[float]] = []  # [start, end] (time.time) of each reply
    result["windows"] = windows

    async def reply(user: str) -> None:
        windows.append([time.time(), 0.0])
        await asyncio.wait_for(session.run(user_input=user), 30)
        windows[-1][1] = time.time()

    await session.start(new_agent())
    try:
        await reply(users[0])
        conv = plugin.conversation(session)
        result["conversation_type"] = type(conv).__name__
        await wait_until(lambda: len(conv.turns) == 2 and conv.turns[-1].frames > 0, limit_s=10)
        _emit({"event": "ready", "turns": len(conv.turns)})
        await asyncio.wait_for(_read_go(stdin), 30)
        result["go_at"] = time.time()

        await reply(users[1])

        # the third reply is interrupted once a bit of it was heard
        windows.append([time.time(), 0.0])
        before = len(audio.finished)
        handle = session.generate_reply(user_input=users[2])
        await wait_until(lambda: audio.segment_started.is_set() and len(audio.segments) == 3)
        await wait_until(lambda: audio._played_s() >= HEARD_S)
        await session.interrupt()
        await asyncio.wait_for(handle, 30)
        windows[-1][1] = time.time()
        assert len(audio.finished) == before + 1, audio.finished
        position, interrupted = audio.finished[-1]
        result["interrupt"] = {"position_s": position, "interrupted": interrupted}
        # the server's snapshot of the history, cut to what was heard, arrives just after
        await wait_until(
            lambda: len(conv.turns) == 6 and conv.turns[-1].role == "assistant"
            and conv.turns[-1].frames * FRAME_S <= position + FRAME_S,
            limit_s=10,
        )

        await reply(users[3])
        await wait_until(lambda: len(conv.turns) == 8 and conv.turns[-1].frames > 0, limit_s=10)
        result["done_at"] = time.time()

        result["audio_s"] = [sum(f.duration for f in seg) for seg in audio.segments]
        result["finished"] = [list(item) for item in audio.finished]
        result["server_turns"] = [
            {"role": t.role, "text": t.text, "frames": t.frames} for t in conv.turns
        ]
        result["assistant"] = [
            {"text": m.text_content or "", "interrupted": m.interrupted}
            for m in assistant_messages(session)
        ]
        result["history"] = [
            {"role": item.role, "text": item.text_content or ""}
            for item in session.history.items if item.type == "message"
        ]
    finally:
        await session.aclose()
        await audio.aclose()
        await plugin.aclose()
        await remote.aclose()


async def main(url: str, token: str, name: str, result: dict[str, Any]) -> None:
    try:
        await asyncio.wait_for(run_job(url, token, name, result), DEADLINE_S)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which asserts on it
        result["errors"].append("".join(traceback.format_exception(exc)))


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parents[1]), str(here)]  # the repository (core, moss_livekit), lk_kit
    url_, token_, name_, out = sys.argv[1:5]
    result_: dict[str, Any] = {"name": name_, "errors": [], "started_at": time.time()}
    logging.getLogger().addHandler(_ErrorLog(result_["errors"]))
    try:
        asyncio.run(main(url_, token_, name_, result_))
    finally:
        Path(out).write_text(json.dumps(result_))
