"""`TTS`: MOSS-TTS-Realtime as a LiveKit Agents streaming TTS on the shared in-process engine.

Each `SynthesizeStream` is ONE engine turn: every text delta LiveKit forwards goes straight into
the turn (no sentence buffering), audio is emitted as the engine decodes it, and the engine's word
timings become `TimedString`s for LiveKit's transcript synchronizer. The conversation context
(earlier turns, the voice prompt) belongs to the session's `RoomContext` (see `room.py`).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from livekit.agents import tts, utils
from livekit.agents.types import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    NotGivenOr,
)
from livekit.agents.voice.io import TimedString

from core import Conversation, EngineConfig, SamplingParams, Voice
from core.audio import check_voice_file
from core.engine.protocol import EngineLike
from core.languages import check_language

from . import compat
from .engine import DEFAULT_CODEC, DEFAULT_MODEL, shared_engine
from .errors import to_api_error
from .log import logger
from .room import RoomContext, TurnRecord

if TYPE_CHECKING:
    from livekit.agents.voice import AgentSession, SpeechHandle

    from core.remote import RemoteConversation

SAMPLE_RATE = 24000
NUM_CHANNELS = 1
VoiceSource = Voice | str | Path | bytes | np.ndarray


@dataclass(slots=True)
class _TTSOptions:
    """What a turn is spoken with; each stream takes a snapshot, so updates apply to the next."""

    voice: VoiceSource | None
    sampling: SamplingParams | None
    frame_size_ms: int
    language: str | None = None  # checked only: the model speaks the text's own language


class TTS(tts.TTS):
    """MOSS-TTS-Realtime for LiveKit Agents: streaming text in, 24 kHz mono PCM out.

    Create one instance per `AgentSession` (it owns that session's conversation); every instance
    of the process shares one `Engine`, loaded once.

    Args:
        engine: a loaded engine to use (a `core.Engine`, or a `core.remote.RemoteEngine` for
            an engine served by `moss-tts serve`); None loads (once per process) `model` + `codec`.
        model: model directory or hub id, used when `engine` is None.
        codec: codec directory or hub id, used when `engine` is None.
        device: device for a lazily loaded engine ("auto": CUDA when present; "cpu", "cuda:N").
        engine_config: `EngineConfig` for a lazily loaded engine.
        voice: reference audio (path, bytes, float array at 24 kHz), a loaded `Voice`, or None
            for the model's default voice.
        sampling: sampling parameters of this conversation (None: engine defaults).
        frame_size_ms: the largest audio frame LiveKit receives (its emitter re-chunks PCM).
        capture_user_audio: also give the model the user's speech of each turn (tapped from
            the session's audio input while VAD reports the user speaking), not only the text.
            When the session transcribes the user, speech that got no words (a sound LiveKit
            made no user turn of) is dropped, not given with the next turn.
        language: a check, not a switch (the model has no language input and speaks the text in
            the language it is written in): None or a language it speaks ("en", "pt-BR", a
            `LanguageCode`; see `core.languages`) is accepted, any other raises `ValueError`.
    """

    def __init__(
        self,
        *,
        engine: EngineLike | None = None,
        model: str | Path = DEFAULT_MODEL,
        codec: str | Path = DEFAULT_CODEC,
        device: str = "auto",
        engine_config: EngineConfig | None = None,
        voice: VoiceSource | None = None,
        sampling: SamplingParams | None = None,
        frame_size_ms: int = 200,
        capture_user_audio: bool = True,
        language: str | None = None,
    ) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
            sample_rate=SAMPLE_RATE,
            num_channels=NUM_CHANNELS,
        )
        if engine is not None and not isinstance(engine, EngineLike):
            raise TypeError(
                f"engine must be a core.Engine or core.remote.RemoteEngine, "
                f"got {type(engine).__name__}"
            )
        if engine_config is not None and not isinstance(engine_config, EngineConfig):
            raise TypeError(f"engine_config must be an EngineConfig, got {engine_config!r}")
        if isinstance(frame_size_ms, bool) or not isinstance(frame_size_ms, int):
            raise TypeError(f"frame_size_ms must be an int, got {frame_size_ms!r}")
        if not 10 <= frame_size_ms <= 1000:
            raise ValueError(f"frame_size_ms must be within 10..1000, got {frame_size_ms}")
        self._engine = engine
        self._capture_user_audio = bool(capture_user_audio)
        self._engine_args = (model, codec, device, engine_config)
        self._opts = _TTSOptions(
            voice=_check_voice(voice),
            sampling=_check_sampling(sampling),
            frame_size_ms=frame_size_ms,
            language=check_language(language),
        )
        self._rooms: weakref.WeakKeyDictionary[AgentSession, RoomContext] = (
            weakref.WeakKeyDictionary()
        )
        self._direct_room: RoomContext | None = None
        self._streams: weakref.WeakSet[SynthesizeStream] = weakref.WeakSet()
        self._prewarm_task: asyncio.Task[None] | None = None

    @property
    def model(self) -> str:
        return "MOSS-TTS-Realtime"

    @property
    def provider(self) -> str:
        return "moss-self-hosted"

    @property
    def engine(self) -> EngineLike | None:
        """The engine serving this instance, once loaded."""
        return self._engine

    def conversation(
        self, session: AgentSession | None = None
    ) -> Conversation | RemoteConversation | None:
        """The engine `Conversation` of `session` (None: direct `stream()` use), if started."""
        room = self._rooms.get(session) if session is not None else self._direct_room
        return room.conversation if room is not None else None

    def attach(self, session: AgentSession) -> None:
        """Bind to `session` before it starts, so transcripts of its very first turn are seen.

        Optional: streams opened by a session bind it on their own. Call this on the session's
        event loop.
        """
        if self._engine is None:
            raise RuntimeError("attach() needs a loaded engine; pass engine= or await prewarm")
        self._room_for(session, self._engine)

    def update_options(
        self,
        *,
        voice: NotGivenOr[VoiceSource | None] = NOT_GIVEN,
        sampling: NotGivenOr[SamplingParams | None] = NOT_GIVEN,
        language: NotGivenOr[str | None] = NOT_GIVEN,
    ) -> None:
        """Change the voice or sampling; a turn already speaking keeps its own, the next one uses
        the new values (the engine rebuilds the voice prefix from that turn on). `language` is
        only checked (see the class docstring): an unspoken one raises `ValueError` and the
        options stay as they were."""
        if utils.is_given(language):
            language = check_language(language)  # first, so a refusal changes nothing
        if utils.is_given(voice):
            self._opts.voice = _check_voice(voice)
        if utils.is_given(sampling):
            self._opts.sampling = _check_sampling(sampling)
        if utils.is_given(language):
            self._opts.language = language

    def prewarm(self) -> None:
        """Load the engine and the voice in the background (LiveKit calls this on the loop)."""
        if self._prewarm_task is not None and not self._prewarm_task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (called from sync setup code): the first stream loads instead
        self._prewarm_task = loop.create_task(self._prewarm(), name="moss_livekit.prewarm")

    async def _prewarm(self) -> None:
        try:
            engine = await self._get_engine()
            await self._get_voice(engine, self._opts.voice)
        except Exception:
            logger.exception("prewarm failed; the first turn will try again")

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> ChunkedStream:
        return ChunkedStream(tts=self, input_text=text, conn_options=conn_options)

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> SynthesizeStream:
        stream = SynthesizeStream(tts=self, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    async def aclose(self) -> None:
        """Close open streams and this instance's conversations (the shared engine stays)."""
        if self._prewarm_task is not None:
            await utils.aio.cancel_and_wait(self._prewarm_task)
        for stream in list(self._streams):
            await stream.aclose()
        self._streams.clear()
        rooms = list(self._rooms.values())
        if self._direct_room is not None:
            rooms.append(self._direct_room)
        self._rooms.clear()
        self._direct_room = None
        for room in rooms:
            await room.aclose()

    # ---- internals shared by both stream kinds --------------------------------------------

    async def _get_engine(self) -> EngineLike:
        if self._engine is None:
            model, codec, device, config = self._engine_args
            engine = await asyncio.to_thread(
                shared_engine, model, codec, device=device, config=config
            )
            self._engine = self._engine or engine
        return self._engine

    async def _get_voice(self, engine: EngineLike, source: VoiceSource | None) -> Voice | None:
        """The engine's voice for the setting (the engine caches it: files by path, size and
        time, other audio by content)."""
        if source is None or isinstance(source, Voice):
            return source
        rate = SAMPLE_RATE if isinstance(source, np.ndarray) else None  # arrays: 24 kHz
        return await engine.load_voice(source, sample_rate=rate)

    def _room_for(self, session: AgentSession | None, engine: EngineLike) -> RoomContext:
        if session is None:
            if self._direct_room is None:
                self._direct_room = RoomContext(engine, None)
            return self._direct_room
        room = self._rooms.get(session)
        if room is None or room.closed:  # new, or the session was closed and started again
            room = self._rooms[session] = RoomContext(
                engine, session, capture_user_audio=self._capture_user_audio
            )
        return room


def _check_voice(voice: Any) -> VoiceSource | None:
    """Fail at configuration time, not at the first reply of a live call."""
    check_voice_file(voice)  # InvalidAudioError, a ValueError
    if voice is None or isinstance(voice, (Voice, str, Path, bytes, np.ndarray)):
        return voice
    raise TypeError(f"voice must be a Voice, a path, bytes, an array or None, got {voice!r}")


def _check_sampling(sampling: Any) -> SamplingParams | None:
    if sampling is None or isinstance(sampling, SamplingParams):
        return sampling
    raise TypeError(f"sampling must be a SamplingParams or None, got {sampling!r}")


@dataclass(slots=True)
class _TurnJob:
    """Everything one engine turn needs, captured when the stream is created."""

    tts: TTS
    opts: _TTSOptions
    session: AgentSession | None
    speech: SpeechHandle | None
    timeout_s: float
    request_id: str
    probe: bool = False  # a FallbackAdapter recovery probe: its audio is never played


async def _speak(
    job: _TurnJob,
    deltas: AsyncIterator[str],
    emitter: tts.AudioEmitter,
    mark_started: Callable[[], None],
) -> None:
    """Run one engine turn: deltas in, PCM and word timings out, context settled afterwards."""
    first = await _first_words(deltas)
    if first is None:
        return  # no words at all: no engine turn, so nothing enters the conversation
    try:
        engine = await job.tts._get_engine()
        voice = await job.tts._get_voice(engine, job.opts.voice)
        room = job.tts._room_for(job.session, engine)
        record = room.open_turn(
            voice, job.opts.sampling, job.speech, forwarded=not job.probe
        )
    except Exception as exc:
        raise to_api_error(exc, request_id=job.request_id) from exc
    failed = True
    try:
        async with record.turn:  # leaving early (cancel, error) stops the engine turn
            feeder = asyncio.create_task(_feed(record, first, deltas, mark_started))
            try:
                await _pump_audio(job, record, feeder, emitter)
                await feeder  # a text error (e.g. too long) surfaces here
                failed = False
            finally:
                await utils.aio.cancel_and_wait(feeder)
                if failed and not record.resolved:
                    record.turn.stop()  # stop the GPU now; what was heard is settled later
    except Exception as exc:
        raise to_api_error(exc, request_id=job.request_id) from exc
    finally:
        room.stream_finished(record, cancelled=failed)


async def _first_words(deltas: AsyncIterator[str]) -> str | None:
    """Wait for the first delta with a visible character, so whitespace never opens a turn."""
    async for delta in deltas:
        if delta.strip():
            return delta.lstrip()
    return None


async def _feed(
    record: TurnRecord, first: str, deltas: AsyncIterator[str], mark: Callable[[], None]
) -> None:
    turn = record.turn
    mark()  # text reaches the model now: LiveKit's TTFB anchor
    try:
        turn.push_text(first)
        async for delta in deltas:
            turn.push_text(delta)
        turn.end_text()
    except Exception:
        if not record.resolved:  # never undo a cut to the played position
            turn.stop()  # ends the audio loop, so this error surfaces from `await feeder`
        raise


async def _pump_audio(
    job: _TurnJob, record: TurnRecord, feeder: asyncio.Task[None], emitter: tts.AudioEmitter
) -> None:
    """Emit chunks as decoded; once the text has ended, a silent engine is a timeout."""
    chunks = record.turn.__aiter__()
    while True:
        try:
            if feeder.done():
                chunk = await asyncio.wait_for(chunks.__anext__(), job.timeout_s)
            else:
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise TimeoutError(f"no audio from the engine for {job.timeout_s:.1f}s") from None
        except Exception:
            if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
                return  # the feeder's own error is the one to report
            raise
        if chunk.words:
            emitter.push_timed_transcript(
                [TimedString(w.word, start_time=w.start_s, end_time=w.end_s) for w in chunk.words]
            )
        if chunk.pcm:
            emitter.push(chunk.pcm)
            record.emitted_s += chunk.duration_s


def _new_job(tts_: TTS, conn_options: APIConnectOptions) -> _TurnJob:
    session, speech = compat.current_speech()
    return _TurnJob(
        tts=tts_,
        opts=replace(tts_._opts),
        session=session,
        speech=speech,
        timeout_s=conn_options.timeout,
        request_id=utils.shortuuid(),
        probe=compat.in_fallback_probe(),  # read here: a probe's stream is created in its task
    )


def _start_attempt(job: _TurnJob, emitter: tts.AudioEmitter, *, stream: bool) -> _TurnJob:
    """A fresh request id per attempt (LiveKit retries with a new emitter), emitter set up for
    24 kHz mono PCM."""
    job = replace(job, request_id=utils.shortuuid())
    emitter.initialize(
        request_id=job.request_id,
        sample_rate=SAMPLE_RATE,
        num_channels=NUM_CHANNELS,
        mime_type="audio/pcm",
        frame_size_ms=job.opts.frame_size_ms,
        stream=stream,
    )
    return job


class SynthesizeStream(tts.SynthesizeStream):
    """One reply segment: LiveKit's text deltas in, one engine turn, audio out as decoded."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._job = _new_job(tts, conn_options)

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        job = _start_attempt(self._job, output_emitter, stream=True)
        output_emitter.start_segment(segment_id=job.request_id)
        # one segment per stream (LiveKit deprecated more): the first flush ends the turn's text
        deltas = compat.text_until_flush(self)
        await _speak(job, deltas, output_emitter, lambda: compat.mark_started(self))
        output_emitter.end_segment()


class ChunkedStream(tts.ChunkedStream):
    """`synthesize(text)`: the whole text as one engine turn of the same conversation."""

    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._job = _new_job(tts, conn_options)

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        job = _start_attempt(self._job, output_emitter, stream=False)
        await _speak(job, _once(self.input_text), output_emitter, lambda: None)


async def _once(text: str) -> AsyncIterator[str]:
    yield text
