"""A phone bot: Twilio-style media streams over a websocket, 8 kHz mu-law, MOSS-TTS-Realtime voice.

    python examples/pipecat_phone_bot.py [--model DIR --codec DIR] [--voice ref.wav]
        [--llm scripted|openai] [--stt none|openai|deepgram] [--host 127.0.0.1] [--port 8765]

Point a Twilio number's voice webhook at `https://YOUR_HOST/twiml` (e.g. through a tunnel); the
returned TwiML connects the call's media stream to `wss://YOUR_HOST/ws`. Each call gets its own
pipeline and `MossTTSService` on the one shared `Engine`; MOSS's 24 kHz audio is resampled to
8 kHz by the service and mu-law encoded by Pipecat's `TwilioFrameSerializer`.

Scripted mode (default) needs no network or keys: the bot greets the caller and answers each turn
with a canned reply streamed token by token. With TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN set,
the bot also hangs the call up through Twilio's REST API when the pipeline ends; without them it
just closes the websocket (which is what the tests and local clients use).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from loguru import logger
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from pipecat.workers.runner import WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pipecat_common import bot_arg_parser, build_voice_worker, serve_bot  # noqa: E402

from core import Engine  # noqa: E402

PHONE_RATE = 8000


def twiml(host: str) -> str:
    """TwiML that connects an incoming call's audio to this server's websocket."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        f'<Stream url="wss://{host}/ws"/></Connect><Pause length="40"/></Response>'
    )


def make_serializer(stream_sid: str, call_sid: str | None) -> TwilioFrameSerializer:
    """Hang up through Twilio's API only when credentials are configured."""
    account, token = os.environ.get("TWILIO_ACCOUNT_SID"), os.environ.get("TWILIO_AUTH_TOKEN")
    if account and token and call_sid:
        return TwilioFrameSerializer(stream_sid, call_sid, account_sid=account, auth_token=token)
    params = TwilioFrameSerializer.InputParams(auto_hang_up=False)
    return TwilioFrameSerializer(stream_sid, call_sid, params=params)


def create_app(engine: Engine, **bot_options: Any) -> FastAPI:
    """`POST /twiml` for Twilio's webhook and `/ws` for the media stream, one bot per call.

    `app.state.services` lists the `MossTTSService` of each call in progress (status, tests).
    """
    app = FastAPI()
    app.state.services = []

    @app.post("/twiml")
    async def incoming_call(request: Request) -> Response:
        host = request.headers.get("host", "localhost")
        return Response(content=twiml(host), media_type="application/xml")

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        transport_type, call = await parse_telephony_websocket(websocket)
        if transport_type != "twilio":
            logger.warning(f"not a Twilio media stream ({transport_type}); closing")
            await websocket.close()
            return
        transport = FastAPIWebsocketTransport(
            websocket=websocket,
            params=FastAPIWebsocketParams(
                audio_in_enabled=True,
                audio_out_enabled=True,
                add_wav_header=False,
                serializer=make_serializer(call["stream_id"], call.get("call_id")),
            ),
        )
        worker, tts = build_voice_worker(
            transport, engine, in_rate=PHONE_RATE, out_rate=PHONE_RATE, **bot_options
        )
        app.state.services.append(tts)
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        try:
            await runner.run()
        finally:
            await worker.cancel()  # WorkerRunner.run() swallows cancellation: end it for sure
            app.state.services.remove(tts)  # a long-running server must not keep old calls

    return app


def main(argv: list[str] | None = None) -> None:
    serve_bot(create_app, bot_arg_parser(__doc__.splitlines()[0], port=8765).parse_args(argv))


if __name__ == "__main__":
    main()
