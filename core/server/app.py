"""`create_app`: one process's `Engine` behind HTTP and WebSocket (docs/PROTOCOL.md).

Health, readiness and metrics are open (keep `/metrics` on an internal port); everything else
needs `Authorization: Bearer <token>`, compared in constant time. Each conversation socket is a
`Session`; voices encoded here are remembered (bounded) so a `hello`/`speak` can name them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from core import wire
from core.engine.engine import Engine
from core.errors import EngineClosed, InvalidAudioError, ProtocolError
from core.server import metrics
from core.server.auth import Caller, authenticate
from core.server.control import ServerControl
from core.server.limits import ServerLimits
from core.server.parked import SessionTable
from core.server.quota import ClientQuota
from core.server.session import Session
from core.server.voices import VoiceRegistry


def create_app(engine: Engine, *, token: str, limits: ServerLimits | None = None,
               control: ServerControl | None = None) -> FastAPI:
    """The FastAPI app serving `engine` with the shared secret `token`; `control` drains it
    and names it (one is made when not given: `app.state.control`)."""
    if not isinstance(token, str) or not token:
        raise ValueError("create_app needs a non-empty token")
    limits = limits or ServerLimits()
    control = control or ServerControl()
    voices = VoiceRegistry(limits.voice_registry_size)
    sessions = SessionTable(limits.resume_grace_s)
    app = FastAPI(title="moss-tts engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.control = control

    clients: dict[str, int] = {}  # signed clients -> their conversations open now

    def caller(headers: Any) -> Caller | None:
        return authenticate(token, headers.get("authorization"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = not engine.closed and not control.draining and (
            engine.stats().conversations < engine.config.max_conversations)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        body, content_type = metrics.render(engine)
        return Response(body, media_type=content_type)

    @app.post("/v1/voices")
    async def post_voice(request: Request) -> Response:
        if caller(request.headers) is None:
            return _error(401, ProtocolError("missing or wrong token"))
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_voice_bytes:
            return _error(413, InvalidAudioError(
                f"the voice upload has {declared} bytes, max_voice_bytes={limits.max_voice_bytes}"))
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limits.max_voice_bytes:
                return _error(413, InvalidAudioError(
                    f"the voice upload is over max_voice_bytes={limits.max_voice_bytes}"))
        rate_arg = request.query_params.get("sample_rate")
        if rate_arg is not None and not (rate_arg.isdigit() and len(rate_arg) < 10):
            return _error(400, InvalidAudioError(f"sample_rate must be an int, got {rate_arg!r:.40}"))
        try:
            voice = await engine.load_voice(bytes(body), None if rate_arg is None else int(rate_arg))
        except (InvalidAudioError, ValueError, TypeError) as exc:
            return _error(400, exc)
        except EngineClosed as exc:
            return _error(503, exc)
        voices.add(voice)
        return Response(wire.codes_to_wire(voice.codes), media_type="application/octet-stream",
                        headers={"X-Voice-Key": voice.key,
                                 "X-Voice-Duration": repr(voice.duration_s)})

    @app.websocket("/v1/conversation")
    async def conversation(ws: WebSocket) -> None:
        who = caller(ws.headers)
        await ws.accept()
        if who is None:
            await ws.close(wire.CLOSE_UNAUTHORIZED, "missing, wrong or expired token")
            return
        await Session(ws, engine, limits, voices, control, sessions,
                      ClientQuota(clients, who.client, limits.max_conversations_per_client)).run()

    return app


def _error(status: int, exc: BaseException) -> JSONResponse:
    return JSONResponse(wire.error_object(exc), status_code=status)
