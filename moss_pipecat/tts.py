"""MossTTSService: MOSS-TTS-Realtime as a Pipecat TTS stage that streams LLM tokens and keeps context.

One service per pipeline (per call) owns one engine `Conversation`; the `Engine` is shared by every
service in the process. Each LLM response (or `TTSSpeakFrame`) is one Pipecat audio context and one
engine `TurnStream`: `run_tts` hands text to the stream and yields None, a background task appends
decoded audio (resampled to the pipeline rate) and estimated word times to the context, and
`flush_audio` ends the turn's text. Interruptions cancel the stream with the played position
(see `moss_pipecat.turns`) so the conversation keeps only what the listener heard.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from loguru import logger
from pipecat.audio.resamplers.base_audio_resampler import BaseAudioResampler
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    MetricsFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.metrics.metrics import TTSUsageMetricsData
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TextAggregationMode, TTSService
from pipecat.transcriptions.language import Language
from pipecat.utils.tracing.service_decorators import traced_tts
from pipecat.utils.types import NOT_GIVEN, NotGiven

from core import Conversation, Engine, EngineConfig, SamplingParams, Voice, WordTiming
from core.audio import check_voice_file
from core.engine.protocol import EngineLike
from core.errors import AdmissionError, MossError, StreamCancelled
from core.languages import check_language
from moss_pipecat import compat  # checks the Pipecat internals used here, at import
from moss_pipecat.engine_turn import EngineTurn, is_cjk
from moss_pipecat.turns import PlayoutClock, UserTurnQueue, fade_out

if TYPE_CHECKING:
    from core.remote import RemoteConversation

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
# Pipecat closes an audio context after this long without audio, unless told otherwise.
_STOP_FRAME_TIMEOUT_S = getattr(
    inspect.signature(TTSService.__init__).parameters.get("stop_frame_timeout_s"), "default", 3.0
)


@dataclass
class MossTTSSettings(TTSSettings):
    """Runtime settings of `MossTTSService`; all apply from the next turn.

    Parameters:
        voice: Path to a reference recording for the voice prompt (a few seconds of clean speech),
            or None for no voice prompt.
        temperature: Sampling temperature of the audio tokens; 0 picks the most likely token.
        top_p: Nucleus sampling mass (0 < top_p <= 1).
        top_k: Keep only the k most likely tokens (0 = no limit).
        repetition_penalty: Penalty (>= 1 discourages) for codes repeated in the recent window.
        seed: Seed of the conversation's random generator (None = random).
        language: A check, not a switch: the model has no language input and speaks the text in
            the language it is written in. None or a language it speaks (`core.languages`;
            "en", "pt-BR", `Language.ZH`) is accepted, stored as the model's code and used by
            Pipecat's sentence splitter; any other language is refused with an error.
    """

    temperature: float | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    top_p: float | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    top_k: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    repetition_penalty: float | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    seed: int | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


class MossTTSService(TTSService):
    """MOSS-TTS-Realtime text-to-speech for Pipecat, streaming LLM tokens into the model.

    Example::

        engine = Engine.from_pretrained("OpenMOSS/...", "OpenMOSS/...", device="cuda")
        tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(voice="me.wav"))
        pipeline = Pipeline([transport.input(), stt, MossUserTurnCapture(tts), user_agg, llm,
                             tts, transport.output(), assistant_agg])
    """

    Settings = MossTTSSettings
    _settings: MossTTSSettings

    def __init__(
        self,
        *,
        engine: EngineLike | None = None,
        model: str | None = None,
        codec: str | None = None,
        device: str = "auto",
        engine_config: EngineConfig | None = None,
        settings: MossTTSSettings | None = None,
        text_aggregation_mode: TextAggregationMode = TextAggregationMode.TOKEN,
        fade_out_ms: float = 8.0,
        output_chunk_ms: float = 40.0,
        session_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the service.

        Args:
            engine: A shared engine (recommended: one per process, many services): a
                `core.Engine`, or a `core.remote.RemoteEngine` for one served by `moss-tts serve`.
            model: Model directory or hub id, used when no engine is given (the service then owns
                and closes its engine).
            codec: Codec directory or hub id, with `model`.
            device: Device for an engine built here.
            engine_config: Config for an engine built here.
            settings: Partial settings; unspecified fields take the engine's sampling defaults.
            text_aggregation_mode: TOKEN (default) streams LLM deltas straight to the model;
                SENTENCE buffers whole sentences first (adds ~200-300 ms per sentence).
            fade_out_ms: Length of the fade applied to the last audio on interruption.
            output_chunk_ms: The output transport's chunk length (`audio_out_10ms_chunks` x 10).
            session_id: The call's id. With a `RemoteEngine` it routes every connection of the
                call to the same server (a sticky router), and a restarted bot process that
                passes the same id finds its conversation there (default: a random id).
            **kwargs: Passed to `TTSService` (e.g. `sample_rate`, `text_transforms`).
        """
        if (engine is None) == (model is None):
            raise ValueError("MossTTSService needs exactly one of engine= or model= (+ codec=)")
        if model is not None and codec is None:
            raise ValueError("MossTTSService(model=...) also needs codec=")
        if fade_out_ms < 0 or output_chunk_ms <= 0:
            raise ValueError("fade_out_ms must be >= 0 and output_chunk_ms > 0")
        defaults = SamplingParams()
        store = self.Settings(
            model=str(model) if model is not None else "MOSS-TTS-Realtime",
            voice=None,
            language=None,
            **{name: getattr(defaults, name) for name in _SAMPLING_FIELDS},
        )
        if settings is not None:
            store.apply_update(settings)
        store.language = check_language(store.language)  # an unspoken language fails here
        _sampling_from(store)  # bad values fail here, at construction
        check_voice_file(store.voice)  # InvalidAudioError, a ValueError
        super().__init__(
            text_aggregation_mode=text_aggregation_mode,
            push_text_frames=False,
            push_start_frame=True,
            push_stop_frames=False,
            settings=store,
            **kwargs,
        )
        self._token_mode = text_aggregation_mode == TextAggregationMode.TOKEN
        self._context_timeout_s = float(kwargs.get("stop_frame_timeout_s", _STOP_FRAME_TIMEOUT_S))
        self._owns_engine = engine is None
        if engine is None:
            engine = Engine.from_pretrained(model, codec, device=device, config=engine_config)
        self._engine: EngineLike = engine
        self._conv: Conversation | RemoteConversation | None = None
        self._conv_closed = False
        self._session_id = session_id
        self._voice: Voice | None = None  # the loaded voice setting (loaded when it is set)
        self._turns: dict[str, EngineTurn] = {}
        self._latest: EngineTurn | None = None
        self._users = UserTurnQueue()
        self._playout = PlayoutClock()
        self._fade_s = fade_out_ms / 1000.0
        self._chunk_s = output_chunk_ms / 1000.0
        self._moss_keepalive: asyncio.Task | None = None
        self._interrupt_played: dict[str, float] = {}
        self._failed_contexts: set[str] = set()  # replies that failed with an error we reported

    # ----- Pipecat hooks -------------------------------------------------------------------

    def can_generate_metrics(self) -> bool:
        """TTFB (first token to first audio), TTFA and character usage are reported."""
        return True

    @property
    def supports_processing_metrics(self) -> bool:
        """`run_tts` only hands text off, so a processing time would measure nothing."""
        return False

    @property
    def engine(self) -> EngineLike:
        """The engine this service speaks through."""
        return self._engine

    @property
    def conversation(self) -> Conversation | RemoteConversation | None:
        """This call's engine conversation (None before the first turn or `StartFrame`)."""
        return self._conv

    async def start(self, frame: StartFrame) -> None:
        """Open the conversation (loading the voice) so the first reply has no load delay."""
        await super().start(frame)
        if self._moss_keepalive is None:
            self._moss_keepalive = self.create_task(self._keepalive(), "moss_keepalive")
        try:
            if self._conv is None:
                self._voice = await self._load_voice(self._settings.voice)
            self._open_conversation()
        except (MossError, ValueError, OSError) as e:
            await self.push_error(error_msg=f"{self}: cannot open conversation: {e}", exception=e)

    async def stop(self, frame: EndFrame) -> None:
        """Finish playing what is queued, then release the conversation.

        No text follows an `EndFrame`, so a reply still open (its LLM response never ended)
        gets its text ended here; otherwise its audio context, kept alive for LLM pauses,
        would hold the shutdown until the engine's text timeout.
        """
        for turn in list(self._turns.values()):
            turn.end()
        await super().stop(frame)
        await self._shutdown()

    async def cancel(self, frame: CancelFrame) -> None:
        """Stop all GPU work for this call at once."""
        await super().cancel(frame)
        await self._shutdown()

    async def cleanup(self) -> None:
        """Idempotent release: turns, keepalive, conversation and an engine built here."""
        await super().cleanup()
        await self._shutdown()
        if self._owns_engine:
            self._owns_engine = False
            await self._engine.aclose()  # joins the engine thread off the event loop

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Hand `text` to the context's engine turn (opened on first use); audio comes later."""
        turn = self._turns.get(context_id)
        if turn is None or (turn.ended and not turn.truncated):
            turn = self._open_turn(context_id)
        if not self._token_mode and turn.text and not turn.text[-1].isspace():
            # sentences arrive without the space between them (none between CJK sentences)
            if not (is_cjk(turn.text[-1]) or is_cjk(text.lstrip()[:1])):
                text = " " + text.lstrip()
        await self.start_tts_usage_metrics(text)
        try:
            turn.push(text)
            if context_id != compat.turn_context_id(self):
                # A bare TextFrame outside any LLM response or TTSSpeakFrame: nothing will end
                # its text, and the engine speaks one turn per conversation at a time, so an
                # open turn would hold every later reply until the engine's text timeout.
                turn.end()
        except (MossError, ValueError) as e:
            await self.push_error(error_msg=f"{self}: text rejected: {e}", exception=e)
        yield None

    async def flush_audio(self, context_id: str | None = None) -> None:
        """End of the turn's text: the model may now finish the sentence and stop."""
        context_id = context_id or self.get_active_audio_context_id()
        turn = self._turns.get(context_id) if context_id else None
        if turn is not None:
            try:
                turn.end()
            except MossError as e:
                await self.push_error(error_msg=f"{self}: {e}", exception=e)

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        """Stop the engine stream within one step, keeping the turn up to the played audio."""
        await self.stop_all_metrics()
        self._failed_contexts.discard(context_id)  # an interrupted context is never "completed"
        turn = self._turns.pop(context_id, None)
        if turn is not None:
            played = self._interrupt_played.get(context_id, self._playout.played_s(context_id))
            await self._cancel_turn(turn, played)
        await super().on_audio_context_interrupted(context_id)

    # Overrides of Pipecat internals (checked at import, see `compat.INTERNALS`) ----------

    async def _record_context_audio_outcome(self, context_id: str, received_audio: bool) -> None:
        """A reply that failed with our own error (engine full, bad voice) is not a silent
        provider: no second "completed with no audio" error, and it does not count towards the
        base class writing the service off after a few silent replies (an engine that was full a
        moment ago speaks the next reply). Replies that end silent without an error still count."""
        if context_id in self._failed_contexts:
            self._failed_contexts.discard(context_id)
            if not received_audio:
                return
        await super()._record_context_audio_outcome(context_id, received_audio)

    async def _add_word_timestamps(
        self,
        word_times: list[tuple[str, float]],
        context_id: str | None = None,
        includes_inter_frame_spaces: bool = False,
    ) -> None:
        """Words are timed from the reply's first audio; after an LLM pause inside the reply
        (its audio context kept open) the playback sat dry, so later words play that much
        later: add the stall measured when their audio was handed over (this runs in playback
        order, after the audio before the word was pushed)."""
        stall = self._playout.stalled_s(context_id) if context_id else 0.0
        if stall:
            word_times = [(word, t + stall) for word, t in word_times]
        await super()._add_word_timestamps(word_times, context_id, includes_inter_frame_spaces)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Track playback, and settle interrupted turns around the base class's handling."""
        if isinstance(frame, BotStartedSpeakingFrame):
            self._playout.bot_started()
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._playout.bot_stopped()
        if not isinstance(frame, InterruptionFrame):
            await super().process_frame(frame, direction)
            return
        # Snapshot before the base class drops the contexts and the transport its queue.
        self._interrupt_played = {ctx: self._playout.played_s(ctx) for ctx in self._turns}
        registered = set(self.get_audio_contexts())
        fade = self._playout.tail(self._fade_s, self._chunk_s) if self._fade_s else None
        await self._report_interrupted_usage()
        await super().process_frame(frame, direction)
        for ctx, turn in list(self._turns.items()):
            # Fully handed to the transport (the base class no longer knows the context) but not
            # fully played: cut the finished turn at what was heard.
            finished = turn.done.is_set() and ctx not in registered
            if finished and turn.interruptible:
                played = self._interrupt_played.get(ctx, 0.0)
                if played < self._playout.pushed_s(ctx) - 1e-3:
                    turn.cancel(played)
                del self._turns[ctx]
        if fade is not None and fade[0] not in self._turns:
            pad = int(round(self._chunk_s * fade[2]))
            audio = fade_out(fade[1], pad)
            await self.push_frame(OutputAudioRawFrame(audio, fade[2], 1), FrameDirection.DOWNSTREAM)
        self._playout.reset()
        self._interrupt_played = {}

    async def push_frame(
        self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM
    ) -> None:
        """Note every audio frame handed to the transport: the playback clock's timeline."""
        await super().push_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            if frame.context_id:
                self._playout.pushed(frame.context_id, frame.audio, frame.sample_rate)
                turn = self._turns.get(frame.context_id)
                if turn is not None:
                    turn.interruptible = frame.interruptible

    def language_to_service_language(self, language: Language) -> str | None:
        """The model's code for `language` ("zh" for `Language.CMN_CN`); None if unspoken."""
        try:
            return check_language(language)
        except ValueError:
            return None

    # Pipecat's documented override point for settings updates (see `compat.INTERNALS`)
    async def _update_settings(self, delta: TTSSettings) -> dict[str, Any]:
        """Validate (rolling back bad sampling values); turns opened from now on use the result.

        A language the model does not speak is refused before anything applies, so the old
        language stays (and Pipecat's sentence splitter keeps it too).
        """
        if not isinstance(delta.language, NotGiven):
            try:
                delta.language = check_language(delta.language)
            except (TypeError, ValueError) as e:
                delta.language = NOT_GIVEN
                await self.push_error(error_msg=f"{self}: language refused: {e}", exception=e)
        previous = {name: getattr(self._settings, name) for name in (*_SAMPLING_FIELDS, "voice")}
        changed = await super()._update_settings(delta)
        voice = self._settings.voice
        if "voice" in changed:
            try:
                check_voice_file(voice)
            except ValueError as e:
                self._settings.voice = previous["voice"]
                await self.push_error(error_msg=f"{self}: {e}")
            else:  # loaded now, so the next reply opens without waiting for it
                loaded = await self._load_voice(voice)
                if loaded is None and voice is not None:  # unusable (reported): keep the old
                    self._settings.voice = previous["voice"]
                else:
                    self._voice = loaded
        if changed.keys() & set(_SAMPLING_FIELDS):
            try:
                _sampling_from(self._settings)
            except (TypeError, ValueError) as e:
                for name in _SAMPLING_FIELDS:
                    setattr(self._settings, name, previous[name])
                await self.push_error(error_msg=f"{self}: bad sampling settings: {e}", exception=e)
        if "model" in changed:  # one model per engine: a service cannot switch it
            logger.warning(f"{self.name}: runtime update of [model] is not currently supported")
        return changed

    # ----- user turns (fed by MossUserTurnCapture) -----------------------------------------

    def stage_user_text(self, text: str) -> None:
        """Add words the user said; they go into the conversation before the next reply."""
        self._users.add_text(text)

    def stage_user_audio(self, audio: np.ndarray, sample_rate: int) -> None:
        """Add the user's speech (float32 mono); encoded by the engine with the user's words."""
        self._users.add_audio(audio, sample_rate)

    async def on_turn_context_created(self, context_id: str) -> None:
        """A reply starts: what the user said so far goes before it (its engine turn may open a
        little later, when more of the user's next turn may already be staged)."""
        await super().on_turn_context_created(context_id)
        self._users.reply_started(context_id)

    # ----- engine turns --------------------------------------------------------------------

    def _open_turn(self, context_id: str) -> EngineTurn:
        """One request to the engine: the user turns staged before this reply, the voice and
        the sampling as set now (later changes wait for the next reply). The engine queues it
        behind the call's earlier replies, so nothing here waits for them."""
        turn = EngineTurn(
            context_id=context_id,
            seq=self._users.reply_seq(context_id),
            max_chars=self._engine.config.max_text_chars,
        )
        self._turns[context_id] = turn
        self._latest = turn
        error: Exception | None = None
        user = self._users.take(turn.seq)
        try:
            stream = self._open_conversation().speak(
                user=() if user is None else user, voice=self._voice,
                sampling=_sampling_from(self._settings))
        except Exception as e:  # reported by the turn's task, as any failure of the turn
            error = e
            if user is not None and isinstance(e, AdmissionError):  # engine full: what the
                # user said still goes before the next reply
                self._users.put_back(turn.seq, user)
        else:
            turn.attach(stream)
            self._settle_older_turns(turn)
        turn.task = self.create_task(self._run_turn(turn, error), f"moss_turn_{context_id[:8]}")
        return turn

    async def _run_turn(self, turn: EngineTurn, error: Exception | None) -> None:
        """Deliver the turn's audio as it is decoded (or report why it could not open)."""
        ctx = turn.context_id
        resampler = create_stream_resampler(clear_after_secs=None)
        try:
            if error is not None:
                raise error
            assert turn.stream is not None
            async with turn.stream as stream:
                async for chunk in stream:
                    await self._deliver(ctx, chunk.pcm, chunk.sample_rate, chunk.words, resampler)
            tail = await resampler.flush()
            if tail:
                await self._deliver(ctx, tail, self.sample_rate, (), resampler)
        except StreamCancelled:
            pass
        except Exception as e:  # any failure of this turn is the call's error, not a dead task
            self._failed_contexts.add(ctx)
            await self.push_error(error_msg=f"{self}: turn failed: {e}", exception=e)
        finally:
            turn.done.set()
        if not turn.cancelled and self.audio_context_available(ctx):
            await self.append_to_audio_context(ctx, TTSStoppedFrame(context_id=ctx))
            await self.remove_audio_context(ctx)

    async def _deliver(
        self,
        ctx: str,
        pcm: bytes,
        rate: int,
        words: Iterable[WordTiming],
        resampler: BaseAudioResampler,
    ) -> None:
        """Audio at the pipeline rate into the reply's context, then its words' start times."""
        if rate != self.sample_rate:
            pcm = await resampler.resample(pcm, rate, self.sample_rate)
        if pcm:
            frame = TTSAudioRawFrame(pcm, self.sample_rate, 1, context_id=ctx)
            await self.append_to_audio_context(ctx, frame)
        for w in words:
            word = w.word.strip()
            if word:
                cjk = True if is_cjk(word) else None
                await self.add_word_timestamps([(word, w.start_s)], ctx, cjk)

    def _settle_older_turns(self, current: EngineTurn) -> None:
        """Forget finished turns the listener heard in full. One still playing stays: a barge-in
        cuts it at the played position even after the next reply started in the engine (a
        reply before a tool call still playing when the reply after it starts, say). The engine
        can cut only its last few finished turns, so at most that many are kept."""
        finished = [(ctx, t) for ctx, t in self._turns.items()
                    if t is not current and t.done.is_set()]
        cuttable = self._engine.config.cuttable_turns
        for i, (ctx, _) in enumerate(finished):
            heard_all = self._playout.played_s(ctx) >= self._playout.pushed_s(ctx) - 1e-3
            if heard_all or i < len(finished) - cuttable:
                del self._turns[ctx]

    async def _cancel_turn(self, turn: EngineTurn, played_s: float) -> None:
        turn.cancel(played_s)
        if turn.task is not None and not turn.task.done():
            await self.cancel_task(turn.task)
        turn.done.set()

    async def _report_interrupted_usage(self) -> None:
        """In TOKEN mode the base class reports usage at the end of the reply and loses it on
        interruption (pipecat #5611); report the interrupted reply's characters here, as the
        metrics frame `FrameProcessor.start_tts_usage_metrics` pushes (the base class's own
        override skips per-call usage in TOKEN mode)."""
        if not (self._token_mode and self.can_generate_metrics() and self.usage_metrics_enabled):
            return
        model = self._settings.model if isinstance(self._settings.model, str) else ""
        for turn in self._turns.values():
            if not turn.ended and turn.text:
                usage = TTSUsageMetricsData(processor=self.name, model=model, value=len(turn.text))
                await self.push_frame(MetricsFrame(data=[usage]))

    async def _keepalive(self) -> None:
        """Keep contexts of unfinished turns open while the LLM pauses (e.g. tool calls)."""
        interval = max(0.05, min(1.0, self._context_timeout_s / 3))
        while True:
            await asyncio.sleep(interval)
            for ctx, turn in list(self._turns.items()):
                if not turn.done.is_set() and self.audio_context_available(ctx):
                    compat.refresh_audio_context(self, ctx)

    # ----- conversation --------------------------------------------------------------------

    def _open_conversation(self) -> Conversation | RemoteConversation:
        """The call's conversation, opened once (at `StartFrame`, or by the first reply)."""
        if self._conv_closed:
            raise MossError(f"{self} was stopped; its conversation is closed")
        if self._conv is None:
            self._conv = self._engine.conversation(
                voice=self._voice, sampling=_sampling_from(self._settings),
                session_id=self._session_id)
        return self._conv

    async def _load_voice(self, voice: str | None) -> Voice | None:
        """The engine voice for a settings value; a file that cannot be used is reported and the
        call goes on without a voice prompt rather than going silent."""
        if voice is None:
            return None
        try:
            return await self._engine.load_voice(str(voice))
        except (MossError, ValueError, OSError) as e:
            await self.push_error(error_msg=f"{self}: voice {voice!r} unusable: {e}", exception=e)
            return None

    async def _shutdown(self) -> None:
        for turn in list(self._turns.values()):
            if not turn.done.is_set():  # finished turns keep what they said
                await self._cancel_turn(turn, self._playout.played_s(turn.context_id))
        self._turns.clear()
        if self._moss_keepalive is not None:
            await self.cancel_task(self._moss_keepalive)
            self._moss_keepalive = None
        if self._conv is not None and not self._conv_closed:
            self._conv_closed = True  # the object stays readable (history) after the call
            await self._conv.aclose()


def _sampling_from(settings: MossTTSSettings) -> SamplingParams:
    """The engine's sampling parameters from complete settings (ValueError names a bad value)."""
    return SamplingParams(**{name: getattr(settings, name) for name in _SAMPLING_FIELDS})
