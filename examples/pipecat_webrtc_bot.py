"""A browser voice bot over WebRTC (Pipecat SmallWebRTC) speaking with MOSS-TTS-Realtime.

    python examples/pipecat_webrtc_bot.py [--model DIR --codec DIR] [--voice ref.wav]
        [--llm scripted|openai] [--stt none|openai|deepgram] [--port 7860]

then open http://127.0.0.1:7860 and press "Connect". Every browser tab is one call: its own
pipeline and `MossTTSService` (its own conversation) on the one shared `Engine`.

Scripted mode (the default: `--llm scripted --stt none`) needs no network or keys: the bot greets
you and answers each of your turns with the next canned reply, streamed token by token like an
LLM. Talk over it to hear an interruption (voice activity detection with Silero, bundled with
Pipecat). `--llm openai` (OPENAI_API_KEY) and `--stt openai|deepgram` (OPENAI_API_KEY /
DEEPGRAM_API_KEY; deepgram needs `pip install "pipecat-ai[deepgram]"`) make it a real assistant.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from loguru import logger
from pipecat.pipeline.worker import PipelineWorker
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import (
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pipecat_common import bot_arg_parser, build_voice_worker, serve_bot  # noqa: E402

from core import Engine  # noqa: E402
from moss_pipecat import MossTTSService  # noqa: E402


def restrict_ice_to_loopback() -> None:
    """aioice leaves loopback out of its host candidates; on a machine with only `lo` (CI,
    containers) calls would never connect. Use only for local tests and demos."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda *_a, **_k: ["127.0.0.1"]


def build_bot(
    connection: SmallWebRTCConnection, engine: Engine, *, audio_in: bool = True, **options: Any
) -> tuple[PipelineWorker, MossTTSService]:
    """One call on one WebRTC peer connection (browser audio in and out)."""
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(audio_in_enabled=audio_in, audio_out_enabled=True),
    )
    return build_voice_worker(
        transport, engine, audio_in=audio_in, on_disconnect=connection.disconnect, **options
    )


def create_app(engine: Engine, **bot_options: Any) -> FastAPI:
    """The HTTP side: the page, and `POST /api/offer` that starts one bot per connection.

    `app.state.services` lists the `MossTTSService` of each call in progress (status, tests).
    """
    handler = SmallWebRTCRequestHandler()
    bots: set[asyncio.Task] = set()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        for task in list(bots):
            task.cancel()
        await asyncio.gather(*bots, return_exceptions=True)
        await handler.close()

    app = FastAPI(lifespan=lifespan)
    app.state.services = []

    async def run_bot(connection: SmallWebRTCConnection) -> None:
        worker, tts = build_bot(connection, engine, **bot_options)
        app.state.services.append(tts)
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        watchdog = asyncio.create_task(_cancel_if_never_connected(connection, worker))
        try:
            await runner.run()
        finally:
            watchdog.cancel()
            await worker.cancel()  # WorkerRunner.run() swallows cancellation: end it for sure
            app.state.services.remove(tts)  # a long-running server must not keep old calls

    async def on_connection(connection: SmallWebRTCConnection) -> None:
        task = asyncio.create_task(run_bot(connection))
        bots.add(task)
        task.add_done_callback(bots.discard)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return PAGE

    @app.post("/api/offer")
    async def offer(request: Request) -> dict[str, Any]:
        body = await request.json()
        answer = await handler.handle_web_request(SmallWebRTCRequest.from_dict(body), on_connection)
        return answer or {}

    return app


async def _cancel_if_never_connected(
    connection: SmallWebRTCConnection, worker: PipelineWorker, limit_s: float = 15.0
) -> None:
    """A peer that never completes ICE would keep its bot (and a conversation) forever."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while connection.pc.connectionState != "connected":
        if loop.time() > deadline:
            logger.warning("WebRTC peer never connected; dropping the call")
            await worker.cancel()
            return
        await asyncio.sleep(0.1)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>MOSS voice bot</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>MOSS-TTS-Realtime voice bot</h1>
<p><button id="go">Connect</button> <button id="stop" disabled>Hang up</button>
<span id="state"></span></p>
<audio id="audio" autoplay></audio>
<script>
let pc;
const state = (s) => document.getElementById("state").textContent = s;
document.getElementById("go").onclick = async () => {
  pc = new RTCPeerConnection();
  const mic = await navigator.mediaDevices.getUserMedia({audio: true});
  pc.addTransceiver(mic.getAudioTracks()[0], {direction: "sendrecv"});
  pc.addTransceiver("video", {direction: "recvonly"});
  pc.ontrack = (e) => { if (e.track.kind === "audio")
    document.getElementById("audio").srcObject = new MediaStream([e.track]); };
  pc.onconnectionstatechange = () => state(pc.connectionState);
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((ok) => { if (pc.iceGatheringState === "complete") ok();
    else pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && ok(); });
  const r = await fetch("/api/offer", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type})});
  await pc.setRemoteDescription(await r.json());
  document.getElementById("go").disabled = true; document.getElementById("stop").disabled = false;
};
document.getElementById("stop").onclick = () => { pc.close(); state("closed");
  document.getElementById("go").disabled = false; document.getElementById("stop").disabled = true; };
</script></body></html>
"""


def main(argv: list[str] | None = None) -> None:
    parser = bot_arg_parser(__doc__.splitlines()[0], port=7860)
    parser.add_argument("--loopback-only", action="store_true",
                        help="offer only 127.0.0.1 ICE candidates (machines with only `lo`)")
    args = parser.parse_args(argv)
    if args.loopback_only:
        restrict_ice_to_loopback()
    serve_bot(create_app, args)


if __name__ == "__main__":
    main()
