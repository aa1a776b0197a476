"""LiveKit's process per job against one engine server: two `AgentSession`s in two OS processes
(`lk_process_job.py`), each with `moss_livekit.TTS(engine=RemoteEngine(url))`, share the engine
served here on a loopback port, at the same time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import BinaryIO

import pytest
from lk_kit import wait_until
from lk_process_job import FRAME_S, HEARD_S, script

from core.server.run import serving

TOKEN = "lk-processes-token-0123456789abcdef"
CHILD = Path(__file__).resolve().parent / "lk_process_job.py"
NAMES = ("Amber", "Cobalt")
READY_S = 40.0  # start-up (imports on a loaded machine) and the first reply
RUN_S = 30.0  # from `go` to both children's exit
pytestmark = pytest.mark.timeout(90)


async def _ready(proc: asyncio.subprocess.Process) -> dict:
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            raise AssertionError("the child ended before it was ready")
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "ready":
                return event


def _stderr_file(tmp_path: Path, name: str) -> BinaryIO:
    return (tmp_path / f"{name}.stderr").open("wb")


def _report(tmp_path: Path, name: str) -> str:
    """The child's errors and stderr, for a failure message."""
    out, err = tmp_path / f"{name}.json", tmp_path / f"{name}.stderr"
    errors = json.loads(out.read_text())["errors"] if out.exists() else "(no result yet)"
    stderr = err.read_text(errors="replace")[-3000:] if err.exists() else "(no stderr)"
    return f"--- {name}: errors {errors}\nstderr: {stderr}"


async def test_two_agent_sessions_in_two_processes_share_one_server(engine, tmp_path) -> None:
    """Prevents conversations of different job processes mixing, or one process's barge-in
    touching the other: both talk to the same server at once, each hears every reply, its
    interruption cuts only its own turn, and each server conversation holds only its own turns."""
    conversations: list[int] = []  # open conversations on the server, sampled every 20 ms

    def sample() -> None:
        conversations.append(engine.stats().conversations)

    async with serving(engine, token=TOKEN) as url:
        procs: list[asyncio.subprocess.Process] = []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        try:
            for name in NAMES:
                with _stderr_file(tmp_path, name) as err:
                    procs.append(await asyncio.create_subprocess_exec(
                        sys.executable, str(CHILD), url, TOKEN, name,
                        str(tmp_path / f"{name}.json"),
                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                        stderr=err, env=env,
                    ))
            ready = asyncio.gather(*(_ready(p) for p in procs))
            deadline = time.monotonic() + READY_S
            while not ready.done():  # sample the server while the children start
                if time.monotonic() > deadline:
                    ready.cancel()
                    raise AssertionError("children not ready in time:\n"
                                         + "\n".join(_report(tmp_path, n) for n in NAMES))
                sample()
                await asyncio.wait([ready], timeout=0.02)
            if ready.exception() is not None:
                details = "\n".join(_report(tmp_path, n) for n in NAMES)
                raise AssertionError(f"{ready.exception()}:\n{details}")
            # both conversations are open on the server, each holding its first exchange
            at_barrier = engine.stats().conversations
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
            await asyncio.gather(*(p.stdin.drain() for p in procs if p.stdin is not None))
            exited = asyncio.gather(*(p.wait() for p in procs))
            deadline = time.monotonic() + RUN_S
            while not exited.done():
                if time.monotonic() > deadline:
                    exited.cancel()
                    raise AssertionError("children did not finish in time:\n"
                                         + "\n".join(_report(tmp_path, n) for n in NAMES))
                sample()
                await asyncio.wait([exited], timeout=0.02)
            codes = exited.result()
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                if proc.stdin is not None:
                    proc.stdin.close()
            for proc in procs:
                await asyncio.wait_for(proc.wait(), 10)
        # the sockets ended with the processes: the server closed their conversations
        await wait_until(lambda: engine.stats().conversations == 0, limit_s=5.0)

    assert codes == [0, 0], [_report(tmp_path, n) for n in NAMES]
    results = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in NAMES}
    for name, res in results.items():
        assert res["errors"] == [], (name, res["errors"], _report(tmp_path, name))

    # the server saw the two conversations at the same time
    assert at_barrier == 2
    assert max(conversations) == 2
    starts = [min(w[0] for w in results[n]["windows"][1:]) for n in NAMES]
    ends = [max(w[1] for w in results[n]["windows"][1:]) for n in NAMES]
    assert max(starts) < min(ends), (starts, ends)  # the replies after `go` overlapped

    for name, res in results.items():
        users, replies = script(name)
        other = next(n for n in NAMES if n != name)
        assert res["conversation_type"] == "RemoteConversation"
        # every reply was heard: four audio segments, each with audio
        assert len(res["audio_s"]) == 4 and all(s > 0 for s in res["audio_s"]), res["audio_s"]
        finished = res["finished"]
        assert [i for _, i in finished] == [False, False, True, False], finished
        position = res["interrupt"]["position_s"]
        assert res["interrupt"]["interrupted"] and position >= HEARD_S

        # the session's context: its own replies, the third one cut to what was heard
        said = res["assistant"]
        assert [m["interrupted"] for m in said] == [False, False, True, False], said
        assert [m["text"] for i, m in enumerate(said) if i != 2] == [
            r for i, r in enumerate(replies) if i != 2
        ]
        heard = said[2]["text"].strip()
        assert heard and replies[2].startswith(heard) and len(heard) < len(replies[2]), heard
        assert [m["text"] for m in res["history"] if m["role"] == "user"] == users

        # the server's conversation: exactly this session's turns, the cut one as heard
        turns = res["server_turns"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * 4, turns
        assert [t["text"] for t in turns[0::2]] == users
        assistant = turns[1::2]
        assert all(t["frames"] > 0 for t in assistant), assistant
        for i, (turn, full) in enumerate(zip(assistant, replies, strict=True)):
            kept = turn["text"].strip()
            assert kept and full.startswith(kept), (i, kept)
        cut = assistant[2]
        assert len(cut["text"].strip()) < len(replies[2])
        assert cut["frames"] * FRAME_S <= position + FRAME_S, (cut, position)
        assert not any(other in t["text"] for t in turns), turns
        assert not any(other in m["text"] for m in res["history"]), res["history"]
