"""A LiveKit voice agent that speaks with MOSS-TTS-Realtime; every room of the worker shares one
engine (THREAD executor, one model in memory, turns of all rooms batched on one device thread).

    python examples/livekit_agent.py download-files   # fetch the weights ahead of time
    python examples/livekit_agent.py console --text   # no LiveKit server; needs libportaudio2
    python examples/livekit_agent.py dev              # against a server: LIVEKIT_URL, _API_KEY, _SECRET

`console --text` checks the wiring only: a session without an audio output never calls its TTS.
`python examples/livekit_tts_check.py -o out/` is the check that the plugin really speaks.
`download-files` needs network access (or a pre-filled Hugging Face cache); when it cannot fetch
the weights it says which repo and why, and exits with status 1.

Environment:
    MOSS_MODEL, MOSS_CODEC  directory or hub id (defaults: the OpenMOSS checkpoints)
    MOSS_TINY=1             tiny random weights instead (a smoke test: the speech is noise)
    MOSS_DEVICE             "auto" (default: CUDA when available), "cpu", "cuda:N"
    MOSS_VOICE              reference audio file for voice cloning (optional)
    AGENT_LLM, AGENT_STT    LiveKit Inference model ids, e.g. "openai/gpt-4.1-mini" and
                            "deepgram/nova-3"; without AGENT_LLM a local echo LLM answers, so the
                            example runs with no network at all
"""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
from typing import Any

from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    JobContext,
    JobExecutorType,
    JobProcess,
    cli,
    llm,
    utils,
)
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions

import moss_livekit  # top level, main thread: registers the plugin (download-files)
from core import EngineConfig


class EchoLLM(llm.LLM):
    """An offline stand-in for a real LLM: answers by repeating the user, streamed per word."""

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[Any] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        **_: Any,
    ) -> llm.LLMStream:
        users = [m for m in chat_ctx.messages() if m.role == "user"]
        said = (users[-1].text_content or "").strip() if users else ""
        reply = f"You said: {said}" if said else "Hello! Type something and I will say it back."
        return _EchoStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options,
                           reply=reply)


class _EchoStream(llm.LLMStream):
    def __init__(self, llm_: EchoLLM, *, reply: str, **kw: Any) -> None:
        super().__init__(llm_, **kw)
        self._reply = reply

    async def _run(self) -> None:
        rid = utils.shortuuid()
        for i, word in enumerate(self._reply.split(" ")):
            delta = llm.ChoiceDelta(role="assistant", content=word if i == 0 else " " + word)
            self._event_ch.send_nowait(llm.ChatChunk(id=rid, delta=delta))
            await asyncio.sleep(0.03)  # roughly an LLM's token rate


@functools.cache  # every executor thread must get the same weights, hence one engine
def _weights() -> tuple[str, str]:
    if os.environ.get("MOSS_TINY") == "1":
        from core.tiny import write_tiny

        print("MOSS_TINY=1: tiny RANDOM weights, the audio is noise (a wiring smoke test)")
        model_dir, codec_dir = write_tiny(tempfile.mkdtemp(prefix="moss-tiny-"))
        return str(model_dir), str(codec_dir)
    return (
        os.environ.get("MOSS_MODEL", moss_livekit.DEFAULT_MODEL),
        os.environ.get("MOSS_CODEC", moss_livekit.DEFAULT_CODEC),
    )


def setup(proc: JobProcess) -> None:
    """Runs once per executor; in THREAD mode all rooms then get the same engine."""
    model, codec = _weights()
    moss_livekit.prewarm(
        proc, model=model, codec=codec, device=os.environ.get("MOSS_DEVICE", "auto"),
        config=EngineConfig(max_streams=16, max_conversations=32),
    )


server = AgentServer(
    job_executor_type=JobExecutorType.THREAD,  # one process: one model for every room
    setup_fnc=setup,
    load_fnc=moss_livekit.load_fnc,  # engine slot occupancy, not CPU
    load_threshold=0.9,
    initialize_process_timeout=moss_livekit.RECOMMENDED_INITIALIZE_TIMEOUT_S,
)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    engine = ctx.proc.userdata[moss_livekit.USERDATA_KEY]
    tts = moss_livekit.TTS(engine=engine, voice=os.environ.get("MOSS_VOICE"))  # one per session
    # typed input only (console --text): no VAD, no turn detector model to load
    speech_in: dict[str, Any] = {"vad": None, "turn_handling": {"turn_detection": None}}
    if stt_model := os.environ.get("AGENT_STT"):
        speech_in = {"stt": stt_model}  # spoken input; the default VAD finds turns
    session: AgentSession = AgentSession(
        llm=os.environ.get("AGENT_LLM") or EchoLLM(),
        tts=tts,
        use_tts_aligned_transcript=True,
        **speech_in,
    )
    tts.attach(session)  # see the first user turn's transcripts too
    await session.start(agent=Agent(instructions=_INSTRUCTIONS), room=ctx.room)
    session.generate_reply(instructions="Greet the user in one short sentence.")


_INSTRUCTIONS = (
    "You are a friendly voice assistant. Answer in short spoken sentences, without markdown."
)


if __name__ == "__main__":
    cli.run_app(server)
