"""Per-room context: one AgentSession's conversation on the shared engine.

MOSS-TTS-Realtime sounds coherent in a dialogue because every turn is conditioned on the earlier
turns (their text and audio). LiveKit never tells a TTS what the user said or how much of its
audio was heard, so this module learns both from the session and keeps the engine's
`Conversation` equal to what the listener actually experienced:

* user turns: user messages committed to `session.history` (read at the start of each turn, so
  none is missed however early it arrived), and final transcripts for preemptive synthesis, which
  starts before the user message is committed; with the user's speech (`user_audio.py`), where
  the session transcribes the user only the speech that got words (sounds LiveKit made no turn
  of are dropped);
* what was heard: the audio output's `playback_finished` event, attributed to the speech that is
  playing, and only to turns whose audio goes to the session's audio output. An interrupted turn
  is cut to the playback position; a turn whose speech ended without any playback (a discarded
  preemptive reply) is cut to nothing, so it leaves no trace. A `tts.FallbackAdapter` recovery
  probe (the adapter synthesizes, in the background, the reply another TTS is playing and throws
  the audio away) is never credited with that playback and is cut to nothing when it finishes.
  The position may arrive before or after LiveKit cancels the stream; both orders work because
  the engine's `mark_played` applies when a running turn ends, or at once to its recent
  finished turns (the stream's cancel only `stop()`s the engine turn). A reply in
  several segments (`FlushSentinel`) is one engine turn per segment, each cut by its own
  `playback_finished`, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from livekit.agents.voice.io import AudioOutput, PlaybackFinishedEvent

from core import SamplingParams, UserTurn, Voice
from core.engine.protocol import EngineLike
from core.errors import AdmissionError, EngineClosed

from .log import logger
from .user_audio import UserAudioTap

if TYPE_CHECKING:
    from livekit.agents.voice import AgentSession, SpeechHandle

    from core import Conversation, TurnStream
    from core.remote import RemoteConversation, RemoteTurnStream


@dataclass(slots=True)
class TurnRecord:
    """One engine turn opened by a stream, until the engine knows how much of it was heard."""

    turn: TurnStream | RemoteTurnStream
    speech: SpeechHandle | None
    forwarded: bool = True  # its audio goes to the audio output (False: a fallback probe)
    emitted_s: float = 0.0  # audio handed to LiveKit so far
    running: bool = True  # the stream's `_run` still owns the turn
    cancelled: bool = False  # the stream was cancelled (interruption, discard, aclose)
    played_s: float | None = None  # playback position reported by the audio output
    resolved: bool = False  # the engine got its `mark_played(played_s)` or the turn stays whole


@dataclass(slots=True)
class _UserTurn:
    text: str
    item_id: str | None = None
    audio: np.ndarray | None = None  # int16 mono speech of this turn, when tapped
    sample_rate: int | None = None


@dataclass(slots=True)
class _SessionLinks:
    """Event handlers registered on a session and its audio output, kept to unregister them."""

    session: AgentSession
    audio_output: AudioOutput | None = None
    handlers: dict[str, Any] = field(default_factory=dict)


class RoomContext:
    """The conversation of one AgentSession (or of direct `stream()` use without a session).

    Lives on the event loop of that session; the engine behind it is shared by every room.
    """

    def __init__(
        self, engine: EngineLike, session: AgentSession | None, *, capture_user_audio: bool = True
    ) -> None:
        self._engine = engine
        self._capture_user_audio = capture_user_audio
        self._tap: UserAudioTap | None = None
        self._conv: Conversation | RemoteConversation | None = None
        self._records: list[TurnRecord] = []
        self._unsent: list[UserTurn] = []  # user turns of a request the engine refused
        self._seen_user_ids: set[str] = set()
        self._transcripts: list[str] = []  # final transcripts not yet part of a user turn
        self._provisional = ""  # user text added from transcripts before it was committed
        self._transcribing = False  # a transcript with words was seen in this session
        self._links: _SessionLinks | None = None
        self._closed = False
        if session is not None:
            self._link(session)

    # ---- session wiring -------------------------------------------------------------------

    @property
    def session(self) -> AgentSession | None:
        return self._links.session if self._links is not None else None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def conversation(self) -> Conversation | RemoteConversation | None:
        """The engine conversation, created at the first turn."""
        return self._conv

    def _link(self, session: AgentSession) -> None:
        links = _SessionLinks(session=session)
        links.handlers = {
            "user_input_transcribed": self._on_transcribed,
            "user_state_changed": self._on_user_state,
            "agent_false_interruption": self._on_false_interruption,
            "close": self._on_session_close,
        }
        for name, handler in links.handlers.items():
            session.on(name, handler)
        self._links = links
        self._follow_audio_output()
        self._follow_audio_input()

    def _follow_audio_output(self) -> None:
        """Listen to the session's current audio output (it may be replaced after start)."""
        links = self._links
        if links is None:
            return
        current = links.session.output.audio
        if current is links.audio_output:
            return
        if links.audio_output is not None:
            links.audio_output.off("playback_finished", self._on_playback_finished)
        if current is not None:
            current.on("playback_finished", self._on_playback_finished)
        links.audio_output = current

    def _follow_audio_input(self) -> None:
        """Keep the user-speech tap at the head of the session's input (it may be replaced)."""
        links = self._links
        if links is None or not self._capture_user_audio:
            return
        current = links.session.input.audio
        if current is None or current is self._tap:
            return
        if isinstance(current, UserAudioTap):  # another TTS instance tapped it already
            self._tap = current
            return
        self._tap = UserAudioTap(current)
        links.session.input.audio = self._tap

    def _on_user_state(self, ev: Any) -> None:
        self._follow_audio_input()
        if self._tap is not None:
            self._tap.recording = ev.new_state == "speaking"

    def _unlink(self) -> None:
        links, self._links = self._links, None
        if links is None:
            return
        for name, handler in links.handlers.items():
            links.session.off(name, handler)
        if links.audio_output is not None:
            links.audio_output.off("playback_finished", self._on_playback_finished)

    def _on_transcribed(self, ev: Any) -> None:
        text = (getattr(ev, "transcript", None) or "").strip()
        if not text:
            return
        self._transcribing = True  # this session transcribes the user: words mark real speech
        if self._tap is not None:
            self._tap.words_heard()
        if getattr(ev, "is_final", False):
            self._transcripts.append(text)

    def _on_false_interruption(self, _ev: Any) -> None:
        # LiveKit resumed (or gave up on) the agent's reply: the user's sound was not a turn
        if self._tap is not None:
            self._tap.drop_wordless()

    def _on_session_close(self, _ev: Any) -> None:
        self.close()  # the room is over: free its engine conversation now

    # ---- turn preparation -----------------------------------------------------------------

    def open_turn(
        self,
        voice: Voice | None,
        sampling: SamplingParams | None,
        speech: SpeechHandle | None,
        *,
        forwarded: bool = True,
    ) -> TurnRecord:
        """Bring the conversation up to date and open (admit or queue) the next assistant turn.

        `forwarded=False`: the turn's audio never reaches the audio output (a fallback probe);
        it gets no playback credit and is removed when it finishes.

        Raises what the engine raises (`AdmissionError`, `EngineClosed`, `TextTooLongError` for
        a user turn); the caller enters `record.turn` and reports back with `stream_finished`.
        """
        if self._closed:
            raise EngineClosed("this TTS was closed (aclose) or its session ended")
        self._follow_audio_output()
        self._settle_finished()
        if self._conv is None:
            self._conv = self._engine.conversation(voice=voice, sampling=sampling)
        self._follow_audio_input()
        users = self._unsent + [UserTurn(u.text, u.audio, u.sample_rate)
                                for u in self._new_user_turns()]
        # One request: the engine adds the user turns, then speaks with this voice and sampling
        # (None: the engine defaults; the conversation's random stream continues either way).
        # A refused request (engine full) keeps its user turns for the next one.
        try:
            turn = self._conv.speak(user=users, voice=voice, sampling=sampling or SamplingParams())
        except AdmissionError:
            self._unsent = users
            raise
        self._unsent = []
        record = TurnRecord(turn=turn, speech=speech, forwarded=forwarded)
        self._records.append(record)
        if speech is not None:
            speech.add_done_callback(self._on_speech_done)
        return record

    def _new_user_turns(self) -> list[_UserTurn]:
        """User messages committed since the last turn, else the final transcripts (preemptive)."""
        turns: list[_UserTurn] = []
        session = self.session
        if session is not None:
            for item in session.history.items:
                if getattr(item, "type", None) != "message" or item.role != "user":
                    continue
                if item.id in self._seen_user_ids:
                    continue
                self._seen_user_ids.add(item.id)
                text = (item.text_content or "").strip()
                text = self._minus_provisional(text)
                if text:
                    turns.append(_UserTurn(text=text, item_id=item.id))
        if turns:
            self._transcripts.clear()
        elif self._transcripts:
            # preemptive synthesis: the user message is committed only after the reply is chosen
            text = " ".join(self._transcripts)
            self._transcripts.clear()
            self._provisional = f"{self._provisional} {text}".strip()
            turns.append(_UserTurn(text=text))
        if turns and self._tap is not None:
            # with transcription, speech that got no words never was a turn (a cough, an
            # "mm-hm" under the reply): it is dropped, not given with this turn
            speech = self._tap.take(words_only=self._transcribing)
            if speech is not None:
                turns[-1].audio, turns[-1].sample_rate = speech  # what the user said, as heard
        return turns

    def _minus_provisional(self, text: str) -> str:
        """Drop the part of a committed user message that was already added from transcripts."""
        done, self._provisional = self._provisional, ""
        if done and text.startswith(done):
            return text[len(done) :].strip()
        return text

    # ---- what was heard -------------------------------------------------------------------

    def stream_finished(self, record: TurnRecord, *, cancelled: bool) -> None:
        """The stream let go of its turn; settle it now if nothing more can be learned."""
        record.running = False
        record.cancelled = cancelled
        if not record.forwarded:
            self._resolve(record, 0.0)  # nobody heard it, and no playback report is its own
        elif record.played_s is not None:
            self._resolve(record, record.played_s)
        elif cancelled and record.speech is None and self._links is None:
            # direct use without a session: what reached the caller counts as heard
            self._resolve(record, record.emitted_s)
        elif record.speech is not None and record.speech.done():
            self._settle_speech(record.speech)

    def _on_playback_finished(self, ev: PlaybackFinishedEvent) -> None:
        record = self._playing_record()
        if record is None:
            return
        position = min(max(ev.playback_position, 0.0), record.emitted_s)
        if ev.interrupted or record.cancelled:
            record.played_s = position
            self._resolve(record, position)
        else:
            record.played_s = record.emitted_s
            record.resolved = True  # heard in full: the engine keeps the whole turn

    def _playing_record(self) -> TurnRecord | None:
        """The oldest unsettled record with audio of the speech playing now (segments play in
        order); with no current speech, the oldest of any. Only records whose audio goes to the
        audio output count: audio of another speech (a `say` with audio) or of another TTS (a
        fallback's, while MOSS is probed with the same speech) is never credited to a MOSS turn."""
        session = self.session
        speech = session.current_speech if session is not None else None
        candidates = [r for r in self._records if not r.resolved and r.played_s is None]
        candidates = [r for r in candidates if r.forwarded and r.emitted_s > 0.0]
        if speech is not None:
            candidates = [r for r in candidates
                          if r.speech is not None and r.speech.id == speech.id]
        return candidates[0] if candidates else None

    def _on_speech_done(self, speech: SpeechHandle) -> None:
        self._settle_speech(speech)

    def _settle_speech(self, speech: SpeechHandle) -> None:
        """A finished speech's turns that were never played were not heard: cut them to zero."""
        for record in self._records:
            same = record.speech is not None and record.speech.id == speech.id
            if same and not record.resolved and not record.running and record.played_s is None:
                self._resolve(record, 0.0)

    def _settle_finished(self) -> None:
        """Before a new turn: settle what can still be settled and forget settled records."""
        for record in self._records:
            if record.resolved or record.running:
                continue
            if record.speech is not None:
                if record.speech.done():
                    self._settle_speech(record.speech)
                # else: a segment of a speech still playing: its playback_finished settles it
            elif record.cancelled and record.played_s is None:
                self._resolve(record, record.emitted_s)  # direct use: what reached the caller
            else:
                record.resolved = True  # finished and never interrupted: kept whole
        self._records = [r for r in self._records if not r.resolved or r.running]

    def _resolve(self, record: TurnRecord, played_s: float) -> None:
        if record.resolved:
            return
        record.resolved = True
        logger.debug("turn heard up to %.2fs of %.2fs", played_s, record.emitted_s)
        try:
            record.turn.mark_played(played_s)
        except Exception:  # the engine may have moved on (closed, the turn long gone)
            logger.warning("could not truncate a turn to %.2fs", played_s, exc_info=True)

    # ---- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Release the conversation (frees its engine slot) and stop listening to the session."""
        if self._closed:
            return
        self._closed = True
        self._unlink()
        conv, self._conv = self._conv, None
        if conv is not None:
            conv.close()  # non-blocking: the engine thread drops it

    async def aclose(self) -> None:
        self.close()

