"""Every input a caller controls is bounded before any allocation or model work.

Sample rate, audio length, encoded size, sample type and `played_s` are checked where the
caller hands them over, and each refusal is the documented error naming the argument.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
from decimal import Decimal

import numpy as np
import pytest
import soundfile as sf
import torch

import core.audio
from core import EngineConfig, InvalidAudioError, SamplingParams
from core.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, read_audio, resample
from core.codec import MossAudioCodec
from core.engine.commands import MarkPlayed, StopTurn
from core.engine.stream import TurnStatus, TurnStream
from core.model import MossTTSRealtime
from core.text import load_tokenizer
from core.voices import VoiceEncoder
from tests.core.test_engine import make_engine

RANGE = rf"{MIN_SAMPLE_RATE}\.\.{MAX_SAMPLE_RATE}"
USER_LIMIT_S = 2.0


@pytest.fixture(scope="module")
def parts(tiny_dirs):
    """Model, codec and tokenizer loaded once (as in test_engine.py)."""
    model_dir, codec_dir = tiny_dirs
    model = MossTTSRealtime.from_pretrained(model_dir, dtype=torch.float32)
    return model, MossAudioCodec.from_pretrained(codec_dir), load_tokenizer(model_dir)


@pytest.fixture
def engine(parts):
    eng = make_engine(parts, max_user_audio_s=USER_LIMIT_S)
    yield eng
    eng.close()


def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _wav(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _claim_rate(wav: bytes, rate: int) -> bytes:
    """The same WAV with a header that claims another sample rate (libsndfile believes it)."""
    out = bytearray(wav)
    struct.pack_into("<II", out, 24, rate, (rate * 2) & 0xFFFFFFFF)
    return bytes(out)


def _tripwire(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("work reached a stage the bound should have stopped it before")


def _no_engine_thread_work(engine, monkeypatch) -> None:
    """Refusals must happen on the caller's side: nothing may be decoded or encoded for them."""
    monkeypatch.setattr(engine._voices, "encode_user_audio", _tripwire)
    monkeypatch.setattr(engine._voices, "load", _tripwire)


# -- 1. sample rate ---------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [10**12, 1, 7_999, 192_001, 16000.0, "16000", True])
def test_sample_rate_outside_the_range_is_refused_by_name(rate, monkeypatch):
    """sample_rate=10**12 made the resampler allocate 18.6 GiB; any rate outside 8..192 kHz (or
    not an integer) is refused naming `sample_rate` and the range, before any conversion."""
    monkeypatch.setattr(core.audio, "resample_poly", _tripwire)
    with pytest.raises(InvalidAudioError, match=rf"sample_rate.*{RANGE}"):
        read_audio(np.zeros(16000, np.float32), rate)
    with pytest.raises(InvalidAudioError, match=rf"sr_from.*{RANGE}"):
        resample(np.zeros(16000, np.float32), rate, 24000)


def test_a_header_claiming_an_absurd_rate_is_refused(monkeypatch):
    """A WAV header can claim any rate (libsndfile reads 10**9 Hz as given): refused like an
    argument, before the file is decoded."""
    monkeypatch.setattr(core.audio.sf, "read", _tripwire)
    bad = _claim_rate(_wav(_tone(1.0, 8000), 8000), 10**9)
    with pytest.raises(InvalidAudioError, match=rf"sample_rate.*{RANGE}.*1000000000"):
        read_audio(bad)


def test_the_range_edges_and_numpy_integers_are_accepted():
    """8 kHz telephony and 192 kHz studio files are inside the range; a numpy integer rate (what
    array code hands over) counts as an integer."""
    for rate in (MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, np.int64(16000), np.int32(48000)):
        audio, got = read_audio(np.zeros(100, np.float32), rate)
        assert got == rate and type(got) is int and audio.shape == (100,)


async def test_engine_refuses_a_huge_rate_on_the_callers_side(engine, monkeypatch):
    """The reported case: add_user_turn(audio=..., sample_rate=10**12) must fail at once with
    InvalidAudioError, and load_voice likewise, without reaching the engine thread."""
    _no_engine_thread_work(engine, monkeypatch)
    conv = engine.conversation(sampling=SamplingParams(seed=1))
    audio = np.zeros(16000, np.float32)
    with pytest.raises(InvalidAudioError, match=rf"sample_rate.*{RANGE}"):
        await conv.add_user_turn(text="hi", audio=audio, sample_rate=10**12)
    with pytest.raises(InvalidAudioError, match=rf"sample_rate.*{RANGE}"):
        await engine.load_voice(audio, sample_rate=10**12)


def test_resampling_an_odd_rate_has_a_bounded_filter(monkeypatch):
    """191,999 Hz -> 24 kHz exactly needs a 3.8 M-tap filter (~1 s of CPU on the engine thread,
    every stream stalls); an odd rate is approximated within 0.05 % instead, standard rates stay
    exact."""
    seen: list[tuple[int, int]] = []
    real = core.audio.resample_poly

    def spy(x, up, down, **kwargs):
        seen.append((up, down))
        assert max(up, down) <= 3 * 1024, f"filter factors {up}/{down}"
        return real(x, up, down, **kwargs)

    monkeypatch.setattr(core.audio, "resample_poly", spy)
    for rate in (191_999, 96_047, 8_001):
        y = resample(_tone(1.0, rate), rate, 24000)
        assert abs(y.shape[0] / 24000 - 1.0) < 5e-4
    assert resample(_tone(1.0, 44100), 44100, 24000).shape == (24000,)
    assert seen[-1] == (80, 147)  # 44.1 kHz -> 24 kHz is exact


# -- 2. played_s ------------------------------------------------------------------------------

class _Link:
    """A stand-in engine inbox for a bare TurnStream: records the played_s it is handed."""

    def __init__(self) -> None:
        self.cancels: list[float | None] = []

    def wake(self) -> None:
        pass

    def stop_turn(self, turn_id: int, command: StopTurn) -> None:
        self.cancels.append(command.played_s)

    def post(self, command: MarkPlayed, *, strict: bool = True) -> None:
        self.cancels.append(command.played_s)


@pytest.mark.parametrize(
    "played_s", [10**400, "1", True, [1.0], b"1", Decimal("1"), 1 + 0j],
    ids=["huge-int", "str", "bool", "list", "bytes", "decimal", "complex"],
)
def test_cancel_refuses_a_bad_played_s_with_value_error(played_s):
    """cancel(played_s=10**400) raised OverflowError and cancel("1") TypeError; the documented
    error is ValueError naming played_s, and a refused cancel changes nothing."""
    link = _Link()
    stream = TurnStream(link, 1, 100)
    with pytest.raises(ValueError, match="played_s") as info:
        stream.cancel(played_s)
    assert type(info.value) is ValueError
    assert link.cancels == [] and stream.status is TurnStatus.QUEUED


def test_cancel_hands_the_engine_a_float():
    """Any real number (int, numpy float, a big but finite int) reaches the engine as a float."""
    for value, expected in ((10**30, 1e30), (np.float32(0.5), 0.5), (2, 2.0), (None, None)):
        link = _Link()
        TurnStream(link, 1, 100).cancel(value)
        assert link.cancels == [expected] and type(link.cancels[0]) is type(expected)


# -- 2. sample types --------------------------------------------------------------------------

async def test_floating_tensors_of_any_dtype_are_read_as_float32(engine):
    """A bfloat16 tensor (what a bf16 model pipeline holds) raised a raw TypeError; floating
    tensors of any dtype are what the caller means as audio, converted to float32."""
    x = _tone(1.5, 24000)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        tensor = torch.from_numpy(x).to(dtype)
        audio, rate = read_audio(tensor, 24000)
        assert audio.dtype == np.float32 and rate == 24000
        np.testing.assert_array_equal(audio, tensor.float().numpy())
    voice = await engine.load_voice(torch.from_numpy(x).to(torch.bfloat16), sample_rate=24000)
    assert voice.codes.shape == (18, 16)
    conv = engine.conversation(sampling=SamplingParams(seed=1))
    user = torch.from_numpy(_tone(1.0, 16000)).to(torch.bfloat16)
    await conv.add_user_turn(text="hi", audio=user, sample_rate=16000)
    assert conv.turns[-1].frames == 12


BAD_SAMPLES = {
    "complex": np.zeros(24000, np.complex64),
    "bool": np.zeros(24000, bool),
    "object": np.full(24000, 0.1, dtype=object),
    "int64": np.zeros(24000, np.int64),
    "uint8": np.zeros(24000, np.uint8),
    "0-d": np.array(0.1, np.float32),
    "3-d": np.zeros((2, 2, 24000), np.float32),
    "20-channels": np.zeros((20, 24000), np.float32),
    "complex-tensor": torch.zeros(24000, dtype=torch.complex64),
    "int64-tensor": torch.zeros(24000, dtype=torch.int64),
    "bool-tensor": torch.zeros(24000, dtype=torch.bool),
    "list": [0.1] * 24000,
}


@pytest.mark.parametrize("sample", BAD_SAMPLES.values(), ids=BAD_SAMPLES.keys())
async def test_unusable_samples_are_refused_naming_the_argument(engine, monkeypatch, sample):
    """Complex, boolean, object, 64-bit integer, wrongly shaped or non-array input is refused
    with InvalidAudioError naming the argument (`source` / `audio`), on the caller's side."""
    _no_engine_thread_work(engine, monkeypatch)
    with pytest.raises(InvalidAudioError, match=r"^source\b"):
        await engine.load_voice(sample, sample_rate=24000)
    conv = engine.conversation(sampling=SamplingParams(seed=1))
    with pytest.raises(InvalidAudioError, match=r"^audio\b"):
        await conv.add_user_turn(text="hi", audio=sample, sample_rate=24000)


# -- 3. length and size -----------------------------------------------------------------------

def test_max_user_audio_s_is_validated():
    """A zero, negative, infinite or non-numeric limit would disable or break the bound."""
    assert EngineConfig().max_user_audio_s == 60.0
    for bad in (0, -1.0, float("nan"), float("inf"), "60", True, None):
        with pytest.raises(ValueError, match="max_user_audio_s"):
            EngineConfig(max_user_audio_s=bad)


async def test_user_audio_over_the_limit_is_refused_before_decoding(engine, monkeypatch, tmp_path):
    """User audio had no length cap: an hour of it was decoded, resampled and encoded on the
    engine thread. Audio over max_user_audio_s is refused from its shape or header at the call."""
    conv = engine.conversation(sampling=SamplingParams(seed=1))
    await conv.add_user_turn(text="ok", audio=_tone(USER_LIMIT_S, 16000), sample_rate=16000)
    assert conv.turns[-1].frames == 25  # exactly at the limit is fine
    _no_engine_thread_work(engine, monkeypatch)
    long = _tone(USER_LIMIT_S + 0.5, 16000)
    path = tmp_path / "long.wav"
    path.write_bytes(_wav(long, 16000))
    sources = [
        (long, 16000),
        (torch.from_numpy(long), 16000),
        ((long * 32767).astype(np.int16).tobytes(), 16000),  # headerless PCM
        (_wav(long, 16000), None),
        (path, None),
        (np.broadcast_to(np.float32(0.0), (10**7,)), 16000),  # 625 s that occupy 4 bytes
    ]
    tracemalloc.start()
    try:
        for source, rate in sources:
            with pytest.raises(InvalidAudioError, match=r"^audio .*max_user_audio_s=2 s"):
                await conv.add_user_turn(text="hi", audio=source, sample_rate=rate)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"refusing took {peak} bytes"


def test_a_long_voice_is_refused_from_its_header(parts, monkeypatch, tmp_path):
    """A voice over 30 s was refused only after the whole file was decoded; the header (or the
    array's shape) says the length first, so nothing is decoded or copied."""
    encoder = VoiceEncoder(parts[1])
    wav = _wav(_tone(31.0, 8000), 8000)
    path = tmp_path / "long.wav"
    path.write_bytes(wav)
    monkeypatch.setattr(core.audio.sf, "read", _tripwire)
    for source in (wav, path):
        with pytest.raises(InvalidAudioError, match=r"^source is too long.*max_seconds=30 s"):
            encoder.load(source)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidAudioError, match=r"^source is too long"):
            encoder.load(np.broadcast_to(np.float32(0.1), (10**7,)), 24000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"refusing took {peak} bytes"


def test_encoded_bytes_are_bounded_by_size_before_reading(parts, tmp_path, monkeypatch):
    """A short WAV followed by megabytes of junk decodes fine, but it was read whole, hashed and
    copied first. Bytes or a file larger than the duration limit allows at the widest accepted
    format (8 channels x 32 bit x 192 kHz) are refused before any of that."""
    encoder = VoiceEncoder(parts[1], min_seconds=0.5, max_seconds=1.0)
    padded = _wav(_tone(1.0, 24000), 24000) + bytes(8 * 2**20)
    path = tmp_path / "padded.wav"
    path.write_bytes(padded)
    monkeypatch.setattr(core.audio.sf, "info", _tripwire)
    for source in (padded, bytearray(padded), memoryview(padded), path):
        with pytest.raises(InvalidAudioError, match=r"^source is too large.*max_seconds=1 s"):
            encoder.load(source)
    with pytest.raises(InvalidAudioError, match=r"^audio is too large.*limit_s=1 s"):
        read_audio(padded, max_seconds=1.0, limit="limit_s")


def test_a_path_the_os_cannot_stat_is_invalid_audio():
    """A 5,000-character "path" (say, text passed where a file name was meant) raised OSError
    (ENAMETOOLONG) from inside pathlib instead of the documented InvalidAudioError."""
    with pytest.raises(InvalidAudioError, match=r"^audio\b"):
        read_audio("x" * 5000)
