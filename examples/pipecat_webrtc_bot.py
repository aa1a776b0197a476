"""A browser voice bot over WebRTC (Pipecat SmallWebRTC) speaking with MOSS-TTS-Realtime.

    python examples/pipecat_webrtc_bot.py [--model DIR --codec DIR] [--voice ref.wav]
        [--llm scripted|openai] [--stt none|openai|deepgram] [--host 127.0.0.1] [--port 7860]
        [--ice-server URL ... [--ice-username U --ice-credential P]]

then open http://127.0.0.1:7860 and press "Connect". Every browser tab is one call: its own
pipeline and `MossTTSService` (its own conversation) on the one shared `Engine`. `GET /health`
answers 200 with JSON (status, calls, the engine's active streams and open conversations).

Scripted mode (the default: `--llm scripted --stt none`) needs no network or keys: the bot greets
you and answers each of your turns with the next canned reply, streamed token by token like an
LLM. Talk over it to hear an interruption (voice activity detection with Silero, bundled with
Pipecat). `--llm openai` (OPENAI_API_KEY) and `--stt openai|deepgram` (OPENAI_API_KEY /
DEEPGRAM_API_KEY; deepgram needs `pip install "pipecat-ai[deepgram]"`) make it a real assistant.

From another machine: a browser grants the microphone only on https or localhost, so serve with
`--host 0.0.0.0` behind an HTTPS reverse proxy or tunnel; peers behind NAT need `--ice-server`
(STUN, and TURN with credentials for symmetric NAT), which both the page and the bot then use.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiortc.exceptions import InvalidAccessError, InvalidStateError
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from loguru import logger
from pipecat.pipeline.worker import PipelineWorker
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import IceServer, SmallWebRTCConnection
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


def create_app(
    engine: Engine, *, ice_servers: Sequence[IceServer] = (), **bot_options: Any
) -> FastAPI:
    """The HTTP side: the page, `POST /api/offer` that starts one bot per connection, and
    `GET /health` for load balancers and monitoring.

    `ice_servers` (STUN/TURN) go to both ends: the bot's peer connections and the page's.
    `app.state.services` lists the `MossTTSService` of each call in progress (status, tests).
    """
    handler = SmallWebRTCRequestHandler(ice_servers=list(ice_servers) or None)
    bots: set[asyncio.Task] = set()
    ice_json = json.dumps([_ice_json(s) for s in ice_servers]).replace("<", "\\u003c")
    page = PAGE.replace("ICE_SERVERS", ice_json)  # the browser's side of the same servers

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
        return page

    @app.get("/health")
    async def health() -> JSONResponse:
        stats, closed = engine.stats(), engine.closed
        body = {
            "status": "closed" if closed else "ok",
            "calls": len(app.state.services),
            "active_streams": stats.active_streams,
            "queued_turns": stats.queued_turns,
            "conversations": stats.conversations,
            "max_streams": engine.config.max_streams,
            "max_conversations": engine.config.max_conversations,
            "ttfa_p50_s": stats.ttfa_p50_s,
            "underruns": stats.underruns,
        }
        return JSONResponse(body, status_code=503 if closed else 200)

    @app.post("/api/offer")
    async def offer(request: Request) -> dict[str, Any]:
        try:
            parsed = parse_offer(await request.body())
            answer = await handler.handle_web_request(parsed, on_connection)
        except (ValueError, InvalidStateError, InvalidAccessError) as exc:  # aiortc: bad offer
            reason = " ".join(str(exc).split()) or type(exc).__name__  # one line, never empty
            logger.warning(f"rejected WebRTC offer: {reason}")
            raise HTTPException(status_code=400, detail=reason) from None
        return answer or {}

    return app


_OFFER_FIELDS = ("sdp", "type", "pc_id", "restart_pc", "request_data")


def parse_offer(body: bytes) -> SmallWebRTCRequest:
    """The offer of `POST /api/offer`, checked before aiortc sees it.

    A bad offer is the client's error (400 with a one-line reason), not a 500 traceback; and
    aiortc accepts some garbage (even an empty sdp) as an offer without media, which would start
    a bot for a peer that can never connect.

    Raises:
        ValueError: the body is not a usable WebRTC offer; the message says why, in one line.
    """
    if not body.strip():
        raise ValueError('empty body: POST the offer as JSON {"sdp": ..., "type": "offer"}')
    try:
        data = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"body must be a JSON object, got {type(data).__name__}")
    if "requestData" in data and "request_data" not in data:  # Pipecat's JS client spelling
        data["request_data"] = data.pop("requestData")
    missing = [k for k in ("sdp", "type") if not isinstance(data.get(k), str) or not data[k]]
    if missing:
        raise ValueError(f"offer needs non-empty string fields {', '.join(missing)}")
    if data["type"] != "offer":
        raise ValueError(f"type must be 'offer', got {data['type']!r}")
    if not isinstance(data.get("pc_id") or "", str):
        raise ValueError("pc_id must be a string")
    _check_sdp(data["sdp"])
    return SmallWebRTCRequest(**{k: data[k] for k in _OFFER_FIELDS if k in data})


def _check_sdp(sdp: str) -> None:
    """What aiortc requires of a remote offer, plus an audio section (the bot is audio only)."""
    from aiortc.sdp import SessionDescription

    if not sdp.startswith("v=0"):
        raise ValueError("sdp is not a session description (it must start with v=0)")
    try:
        media = SessionDescription.parse(sdp).media
    except Exception as exc:  # aiortc's parser fails with asserts, KeyError, IndexError...
        raise ValueError(f"sdp cannot be parsed ({type(exc).__name__}: {exc})") from None
    if not any(m.kind == "audio" for m in media):
        raise ValueError("sdp has no audio section (m=audio)")
    for m in media:
        if not m.ice.usernameFragment or not m.ice.password:
            raise ValueError(f"sdp {m.kind} section lacks ICE credentials (a=ice-ufrag/ice-pwd)")
        if m.kind in ("audio", "video") and not m.rtcp_mux:
            raise ValueError(f"sdp {m.kind} section lacks a=rtcp-mux")


def _ice_json(server: IceServer) -> dict[str, Any]:
    """An `RTCIceServer` in the browser's format (the same field names)."""
    out: dict[str, Any] = {"urls": server.urls}
    if server.username:
        out["username"], out["credential"] = server.username, server.credential
    return out


def ice_servers_from_args(
    urls: Sequence[str], username: str | None, credential: str | None
) -> list[IceServer]:
    """STUN URLs as they are; TURN URLs (turn:, turns:) with the one username and credential."""
    servers: list[IceServer] = []
    for url in urls:
        if not url.startswith(("stun:", "turn:", "turns:")):
            raise SystemExit(f"--ice-server {url!r}: expected stun:HOST[:PORT] or turn:HOST[:PORT]")
        turn = url.startswith("turn")
        if turn and not (username and credential):
            raise SystemExit(f"--ice-server {url!r} is TURN: give --ice-username, --ice-credential")
        servers.append(IceServer(urls=url, username=username if turn else None,
                                 credential=credential if turn else None))
    return servers


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
  if (!navigator.mediaDevices) { state("no microphone access: open this page over https " +
    "(or on localhost)"); return; }
  pc = new RTCPeerConnection({iceServers: ICE_SERVERS});
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
  const answer = await r.json();
  if (!r.ok) { state("offer rejected: " + answer.detail); pc.close(); return; }
  await pc.setRemoteDescription(answer);
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
    parser.add_argument("--ice-server", action="append", default=[], metavar="URL",
                        help="STUN/TURN server for the page and the bot, e.g. "
                             "stun:stun.l.google.com:19302 or turn:turn.example.com:3478 "
                             "(repeatable)")
    parser.add_argument("--ice-username", help="username of the TURN servers")
    parser.add_argument("--ice-credential", help="credential (password) of the TURN servers")
    args = parser.parse_args(argv)
    if args.loopback_only:
        restrict_ice_to_loopback()
    ice = ice_servers_from_args(args.ice_server, args.ice_username, args.ice_credential)
    serve_bot(functools.partial(create_app, ice_servers=ice), args)


if __name__ == "__main__":
    main()
