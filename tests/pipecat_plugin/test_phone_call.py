"""A phone call on loopback: the telephony example and a client speaking Twilio media streams."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import websockets
from moss_pc_support import load_example, serve, wait_for

STREAM_SID = "MZ00000000000000000000000000000001"
SILENCE_20MS = bytes([0xFF]) * 160  # mu-law silence, 8 kHz


def ulaw_to_float(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes to float samples in [-1, 1]."""
    u = ~np.frombuffer(data, dtype=np.uint8)
    exponent = (u >> 4) & 0x07
    magnitude = ((((u & 0x0F).astype(np.int32) << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.float32) / 32768.0


def voiced_seconds(pcm: np.ndarray, rate: int = 8000, frame_s: float = 0.02) -> float:
    n = int(rate * frame_s)
    frames = pcm[: len(pcm) // n * n].reshape(-1, n)
    return float((np.sqrt((frames**2).mean(axis=1)) > 1e-3).sum() * frame_s)


async def test_phone_call_gets_8khz_mulaw_greeting(engine) -> None:
    """A caller must hear the bot over the Twilio media-stream protocol: 8 kHz mu-law media
    messages for this stream, non-silent and as long as the reply the bot generated."""
    phone = load_example("pipecat_phone_bot")
    app = phone.create_app(engine)
    conversations = engine.stats().conversations
    server, server_task, port = await serve(app)
    received: list[np.ndarray] = []
    sids: set[str] = set()

    async def send_line(ws) -> None:
        """The caller's side of the line: silence every 20 ms, like a real phone."""
        while True:
            media = {"event": "media", "streamSid": STREAM_SID,
                     "media": {"payload": base64.b64encode(SILENCE_20MS).decode()}}
            await ws.send(json.dumps(media))
            await asyncio.sleep(0.02)

    async def listen(ws) -> None:
        async for message in ws:
            msg = json.loads(message)
            if msg.get("event") == "media":
                sids.add(msg["streamSid"])
                received.append(ulaw_to_float(base64.b64decode(msg["media"]["payload"])))

    def heard() -> float:
        return voiced_seconds(np.concatenate(received)) if received else 0.0

    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            start = {"accountSid": "AC0", "callSid": "CA0", "streamSid": STREAM_SID,
                     "tracks": ["inbound"],
                     "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
            await ws.send(json.dumps({"event": "start", "start": start, "streamSid": STREAM_SID}))
            tasks = [asyncio.create_task(send_line(ws)), asyncio.create_task(listen(ws))]
            try:
                await wait_for(lambda: bool(app.state.services), limit_s=10)
                tts = app.state.services[0]
                await wait_for(lambda: _reply_seconds(tts) is not None, limit_s=30)
                expected = _reply_seconds(tts)
                await wait_for(lambda: heard() >= expected - 0.1, limit_s=expected + 10)
                await settle(lambda: len(received), quiet_s=0.4)  # a duplicated reply would show
                total = heard()
                await ws.send(json.dumps({"event": "stop", "streamSid": STREAM_SID}))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        # Hang-up (socket closed): the call's service and conversation are released.
        await wait_for(lambda: not app.state.services, limit_s=10)
        await wait_for(lambda: engine.stats().conversations == conversations, limit_s=5)
    finally:
        server.should_exit = True
        await server_task
    assert sids == {STREAM_SID}
    assert expected > 0.3
    assert total == pytest.approx(expected, abs=0.25 + 0.1 * expected)


async def settle(value, quiet_s: float, limit_s: float = 10.0) -> None:
    """Wait until `value()` has not changed for `quiet_s` (the bot stopped sending)."""
    loop = asyncio.get_running_loop()
    last, since, deadline = value(), loop.time(), loop.time() + limit_s
    while loop.time() - since < quiet_s:
        if loop.time() > deadline:
            raise TimeoutError("still receiving")
        await asyncio.sleep(0.02)
        if value() != last:
            last, since = value(), loop.time()


def _reply_seconds(tts) -> float | None:
    turns = tts.conversation.turns if tts.conversation is not None else ()
    return turns[0].frames * 0.08 if turns else None
