"""A real WebRTC call on loopback: the example bot, and an aiortc client that listens to it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import aioice.ice
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from moss_pc_support import load_example, serve, wait_for
from pipecat.transports.smallwebrtc.connection import IceServer


async def test_webrtc_call_receives_the_greeting(engine, monkeypatch) -> None:
    """A browser-like peer must hear the bot's greeting: a connected call, an audio track with
    non-silent audio as long as the reply the bot generated (no cuts, no stall)."""
    bot = load_example("pipecat_webrtc_bot")
    # aioice leaves loopback out of its candidates; this machine may have nothing else.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda *_a, **_k: ["127.0.0.1"])
    app = bot.create_app(engine, audio_in=False)  # receive-only client: no bot audio input
    conversations = engine.stats().conversations
    server, server_task, port = await serve(app)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    received: list[np.ndarray] = []
    reader: asyncio.Task | None = None

    async def read(track) -> None:
        while True:
            frame = await track.recv()
            pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
            received.append(pcm.astype(np.float32) / 32768.0)

    @pc.on("track")
    def on_track(track) -> None:
        nonlocal reader
        if track.kind == "audio":
            reader = asyncio.ensure_future(read(track))

    try:
        pc.addTransceiver("audio", direction="recvonly")
        pc.createDataChannel("rtvi")  # the bot's RTVI messages go here, as with a browser
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
            async with http.post(f"http://127.0.0.1:{port}/api/offer", json=offer) as r:
                assert r.status == 200
                answer = await r.json()
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        await wait_for(lambda: pc.connectionState == "connected", limit_s=15)
        tts = app.state.services[0]
        await wait_for(lambda: _reply_seconds(tts) is not None, limit_s=30)
        expected = _reply_seconds(tts)
        # Everything generated has to arrive, at real time, plus a little transport latency.
        await wait_for(lambda: _voiced_seconds(received) >= expected - 0.1, limit_s=expected + 10)
        settled = len(received) + 25  # 0.5 s more: a duplicated or looping reply would show
        await wait_for(lambda: len(received) >= settled, limit_s=5)
        voiced = _voiced_seconds(received)
        await pc.close()
        # The peer left: its bot ends and gives the conversation back to the engine.
        await wait_for(lambda: not app.state.services, limit_s=10)
        await wait_for(lambda: engine.stats().conversations == conversations, limit_s=5)
    finally:
        if reader is not None:
            reader.cancel()
        await pc.close()
        server.should_exit = True
        await server_task
    assert expected > 0.3
    assert voiced == pytest.approx(expected, abs=0.25 + 0.1 * expected)


def _reply_seconds(tts) -> float | None:
    """Length of the greeting as the engine kept it (None until generated)."""
    turns = tts.conversation.turns if tts.conversation is not None else ()
    return turns[0].frames * 0.08 if turns else None


def _voiced_seconds(chunks: list[np.ndarray], frame_s: float = 0.02) -> float:
    """Seconds of received 48 kHz audio whose 20 ms frames are not silence."""
    if not chunks:
        return 0.0
    pcm = np.concatenate(chunks)
    n = int(48000 * frame_s)
    frames = pcm[: len(pcm) // n * n].reshape(-1, n)
    return float((np.sqrt((frames**2).mean(axis=1)) > 1e-3).sum() * frame_s)


_HEAD = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
_AUDIO = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n"
_CREDS = "a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdef012345\r\n"
# (body, words the 400's message must contain)
BAD_OFFERS: list[tuple[bytes, str]] = [
    (b"", "empty body"),
    (b"{not json", "not JSON"),
    (b"\xff\xfe\x00", "not JSON"),
    (b'["sdp", "offer"]', "JSON object"),
    (json.dumps({"type": "offer"}).encode(), "sdp"),
    (json.dumps({"sdp": _HEAD + _AUDIO}).encode(), "type"),
    (json.dumps({"sdp": _HEAD + _AUDIO + _CREDS, "type": "answer"}).encode(), "'offer'"),
    (json.dumps({"sdp": "hello", "type": "offer"}).encode(), "v=0"),
    (json.dumps({"sdp": "v=0\r\nm=foo\r\n", "type": "offer"}).encode(), "cannot be parsed"),
    (json.dumps({"sdp": _HEAD, "type": "offer"}).encode(), "no audio"),
    (json.dumps({"sdp": _HEAD + _AUDIO, "type": "offer"}).encode(), "ICE credentials"),
    (json.dumps({"sdp": _HEAD + _AUDIO + _CREDS, "type": "offer"}).encode(), "rtcp-mux"),
]


async def test_webrtc_health_and_malformed_offers(engine) -> None:
    """Prevents: a load balancer with no health route to probe, and a bad offer (empty, not JSON,
    no sdp, an sdp aiortc cannot use) answered with a 500 traceback or, worse, a bot started for
    a peer that can never connect; the ICE servers given must reach the page."""
    bot = load_example("pipecat_webrtc_bot")
    stun = IceServer(urls="stun:stun.example.org:3478")
    app = bot.create_app(engine, audio_in=False, ice_servers=[stun])
    server, server_task, port = await serve(app)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/health") as r:
                assert r.status == 200
                health = await r.json()
            async with http.get(base) as r:
                assert r.status == 200 and "stun:stun.example.org:3478" in await r.text()
            for body, words in BAD_OFFERS:
                headers = {"Content-Type": "application/json"}
                async with http.post(f"{base}/api/offer", data=body, headers=headers) as r:
                    assert r.status == 400, (body, r.status, await r.text())
                    detail = (await r.json())["detail"]
                assert words in detail and "\n" not in detail, (body, detail)
            async with http.get(f"{base}/health") as r:
                after = await r.json()
    finally:
        server.should_exit = True
        await server_task
    assert health["status"] == "ok" and health["calls"] == 0
    for key in ("active_streams", "queued_turns", "conversations", "max_streams"):
        assert isinstance(health[key], int), (key, health)
    assert health["max_conversations"] == engine.config.max_conversations
    assert after["calls"] == 0 and after["conversations"] == health["conversations"], after
    assert not app.state.services
