"""Reference and user audio: reading, resampling, validation policy, encoding and the cache."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from core.audio import float_to_int16, int16_to_float, read_audio, resample
from core.codec import MossAudioCodec
from core.errors import InvalidAudioError
from core.tiny import write_tiny_codec
from core.voices import Voice, VoiceEncoder


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> MossAudioCodec:
    directory: Path = tmp_path_factory.mktemp("tiny") / "codec"
    write_tiny_codec(directory, seed=3)
    return MossAudioCodec.from_pretrained(directory)


def _speechish(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """A voiced-looking test signal: two tones plus a little noise, peak ~0.5."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.02, t.shape)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 530 * t) + noise).astype(
        np.float32
    )


def _wav_bytes(x: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("audio", "rate", "message"),
    [
        (_speechish(0.5, 24000), 24000, "too short"),
        (_speechish(31.0, 8000), 8000, "too long"),
        (np.zeros(48000, np.float32), 24000, "silent"),
        (np.sign(_speechish(2.0, 24000)), 24000, "clipped"),
        (np.full(48000, np.nan, np.float32), 24000, "NaN"),
        (np.concatenate([_speechish(2.0, 24000), [np.inf]]), 24000, "infinite"),
        ((_speechish(2.0, 24000) * 100).astype(np.int8), 24000, "dtype"),
        (np.zeros((2, 3, 48000), np.float32), 24000, "1-D or 2-D"),
        (np.zeros((20, 48000), np.float32), 24000, "channels"),
    ],
    ids=["short", "long", "silent", "clipped", "nan", "inf", "int8", "3d", "20ch"],
)
def test_bad_reference_audio_is_rejected(
    codec: MossAudioCodec, audio: np.ndarray, rate: int, message: str
) -> None:
    """Each bad prompt gives a precise error at load time instead of a garbled voice."""
    with pytest.raises(InvalidAudioError, match=message):
        VoiceEncoder(codec).load(audio, sample_rate=rate)


def test_unreadable_sources_are_rejected(codec: MossAudioCodec, tmp_path: Path) -> None:
    """Missing files, garbage bytes and unknown types fail clearly, never deep in the codec."""
    encoder = VoiceEncoder(codec)
    text = tmp_path / "notes.wav"
    text.write_text("definitely not audio")
    with pytest.raises(InvalidAudioError, match="not found"):
        encoder.load(tmp_path / "missing.wav")
    with pytest.raises(InvalidAudioError, match="cannot decode"):
        encoder.load(text)
    with pytest.raises(InvalidAudioError, match="cannot decode"):
        encoder.load(b"\x00\x01garbage" * 10)
    with pytest.raises(InvalidAudioError, match="needs its sample_rate"):
        encoder.load(_speechish(2.0, 24000))
    with pytest.raises(InvalidAudioError, match="unsupported"):
        read_audio(12345)  # type: ignore[arg-type]
    with pytest.raises(InvalidAudioError, match="16000 Hz"):
        read_audio(_wav_bytes(_speechish(1.0, 16000), 16000), sample_rate=24000)


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
def test_resampling_to_24k(codec: MossAudioCodec, rate: int) -> None:
    """Prompts recorded at common rates are resampled properly, not sped up or aliased."""
    x = _speechish(2.0, rate)
    y = resample(x, rate, 24000)
    assert y.dtype == np.float32 and abs(y.shape[0] - 48000) <= 1
    reference = _speechish(2.0, 24000, seed=0)
    # The tones survive resampling (noise differs); compare the 220 Hz + 530 Hz content.
    spectrum = np.abs(np.fft.rfft(y[:48000]))
    peak_bins = sorted(np.argsort(spectrum)[-2:] / 2.0)
    assert peak_bins == [220.0, 530.0]
    assert np.corrcoef(y[1000:47000], reference[1000:47000])[0, 1] > 0.95
    voice = VoiceEncoder(codec).load(x, sample_rate=rate)
    assert voice.codes.shape == (48000 // 1920, 16)


def test_stereo_is_downmixed_in_either_layout() -> None:
    """Stereo files and [C, T] / [T, C] arrays become the channel mean."""
    left, right = _speechish(1.0, 24000), np.zeros(24000, np.float32)
    stereo = np.stack([left, right], axis=1)  # [T, 2]
    from_file, rate = read_audio(_wav_bytes(stereo, 24000))
    np.testing.assert_allclose(from_file, left / 2, atol=1e-6)
    assert rate == 24000
    np.testing.assert_allclose(read_audio(stereo, 24000)[0], left / 2, atol=1e-6)
    np.testing.assert_allclose(read_audio(stereo.T.copy(), 24000)[0], left / 2, atol=1e-6)


def test_path_bytes_and_array_sources_agree(codec: MossAudioCodec, tmp_path: Path) -> None:
    """The same audio gives the same voice whatever form it arrives in (float WAV is lossless)."""
    x = _speechish(1.5, 24000)
    path = tmp_path / "voice.wav"
    path.write_bytes(_wav_bytes(x, 24000))
    encoder = VoiceEncoder(codec)
    voices = [
        encoder.load(path),
        encoder.load(path.read_bytes()),
        encoder.load(x, 24000),
        encoder.load(torch.from_numpy(x), 24000),
    ]
    for v in voices:
        assert isinstance(v, Voice) and v.codes.dtype == torch.long and v.codes.device.type == "cpu"
        assert torch.equal(v.codes, voices[0].codes)
    # 1.5 s = 36000 samples = 18.75 frames: the partial frame is dropped, not zero-padded.
    assert voices[0].codes.shape == (18, 16) and voices[0].duration_s == pytest.approx(1.44)


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]
)
def test_compressed_formats_are_readable(fmt: str, subtype: str) -> None:
    """flac/ogg/mp3 prompts load through the installed libsndfile."""
    x = _speechish(1.0, 24000)
    audio, rate = read_audio(_wav_bytes(x, 24000, fmt, subtype))
    assert rate == 24000 and audio.dtype == np.float32 and abs(audio.shape[0] - 24000) < 2000
    assert np.abs(audio).max() > 0.2


def test_cache_encodes_a_file_once(codec: MossAudioCodec, tmp_path: Path) -> None:
    """Loading the same voice for many conversations must not re-run the codec each time."""
    path, other = tmp_path / "a.wav", tmp_path / "b.wav"
    path.write_bytes(_wav_bytes(_speechish(1.2, 24000, seed=1), 24000))
    other.write_bytes(_wav_bytes(_speechish(1.2, 24000, seed=2), 24000))
    encoder = VoiceEncoder(codec)
    first = encoder.load(path)
    second = encoder.load(path)
    assert second is first and encoder.encodes == 1
    third = encoder.load(other)
    assert third.key != first.key and encoder.encodes == 2
    assert encoder.load(str(path)) is first and encoder.encodes == 2


def test_an_unchanged_voice_file_is_not_read_again(
    codec: MossAudioCodec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prevents every turn of every room re-reading and re-hashing its voice file (the plugins
    load their voice setting per turn and keep no cache of their own); an edited file is new."""
    import os

    from core import voices

    path = tmp_path / "v.wav"
    path.write_bytes(_wav_bytes(_speechish(1.2, 24000, seed=3), 24000))
    hashed: list[object] = []
    real = voices.content_key
    monkeypatch.setattr(voices, "content_key", lambda s, r: hashed.append(s) or real(s, r))
    encoder = VoiceEncoder(codec)
    first = encoder.load(path)
    assert encoder.load(path) is first and encoder.load(str(path)) is first
    assert len(hashed) == 1
    path.write_bytes(_wav_bytes(_speechish(1.2, 24000, seed=4), 24000))
    os.utime(path, ns=(1, 1))  # another size or time: a changed file is read again
    assert encoder.load(path).key != first.key and len(hashed) == 2


def test_user_audio_is_lenient(codec: MossAudioCodec) -> None:
    """Short user utterances encode (no prompt policy); empty gives zero frames; NaN still fails."""
    encoder = VoiceEncoder(codec)
    assert encoder.encode_user_audio(np.zeros(0, np.float32), 16000).shape == (0, 16)
    assert encoder.encode_user_audio(np.zeros(1000, np.float32), 24000).shape == (0, 16)
    pcm = float_to_int16(_speechish(0.3, 16000)).tobytes()  # raw int16 bytes, as frameworks send
    codes = encoder.encode_user_audio(pcm, 16000)
    assert codes.shape == (3, 16) and codes.dtype == torch.long
    silent = encoder.encode_user_audio(np.zeros(4800, np.float32), 24000)
    assert silent.shape == (2, 16)
    with pytest.raises(InvalidAudioError, match="NaN"):
        encoder.encode_user_audio(np.full(4000, np.nan, np.float32), 24000)
    assert encoder.encodes == 2


def test_int16_conversions_clip_and_round_trip() -> None:
    """Hot audio clips instead of wrapping around (a loud click), and PCM bytes decode."""
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], np.float32)
    pcm = float_to_int16(x)
    assert pcm.dtype == np.int16
    assert pcm.tolist() == [-32767, -32767, -16384, 0, 16384, 32767, 32767]
    np.testing.assert_allclose(int16_to_float(pcm.tobytes()), pcm / 32768.0)
    with pytest.raises(InvalidAudioError, match="even length"):
        int16_to_float(b"\x00\x01\x02")
    with pytest.raises(InvalidAudioError, match="float"):
        float_to_int16(pcm)


def _gated_encode(codec: MossAudioCodec, monkeypatch: pytest.MonkeyPatch, fail: bool = False):
    """Wrap the codec's encode: count calls, and hold each one until the test releases it."""
    calls, entered, release = [], threading.Event(), threading.Event()
    real = codec.encode

    def encode(*args, **kwargs):
        calls.append(args)
        entered.set()
        assert release.wait(10), "never released"
        if fail:
            raise RuntimeError("codec failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(codec, "encode", encode)
    return calls, entered, release


def _load_in_threads(encoder: VoiceEncoder, source: np.ndarray, entered, release) -> list:
    """Two loads of `source`: the second starts while the first is inside the codec."""
    results: list = [None, None]

    def load(i: int) -> None:
        try:
            results[i] = encoder.load(source, 24000)
        except Exception as exc:  # handed to the test
            results[i] = exc

    first = threading.Thread(target=load, args=(0,))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=load, args=(1,))
    second.start()
    second.join(0.3)  # let it reach the codec (a second encode) or the wait for the first
    release.set()
    first.join(10)
    second.join(10)
    return results


def test_concurrent_loads_of_one_voice_share_one_encode(
    codec: MossAudioCodec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rooms starting with the same new voice at once must not run the codec twice: the
    second load waits for the first one's encode and gets the same Voice."""
    calls, entered, release = _gated_encode(codec, monkeypatch)
    encoder = VoiceEncoder(codec)
    results = _load_in_threads(encoder, _speechish(1.5, 24000, seed=5), entered, release)
    assert len(calls) == 1 and encoder.encodes == 1
    assert isinstance(results[0], Voice) and results[1] is results[0]


def test_a_failed_shared_encode_fails_its_waiters_and_is_retried(
    codec: MossAudioCodec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the shared encode fails, the waiting load gets that error (not a hang, not a second
    failing encode), and a later load of the same content tries again."""
    calls, entered, release = _gated_encode(codec, monkeypatch, fail=True)
    encoder = VoiceEncoder(codec)
    x = _speechish(1.5, 24000, seed=6)
    results = _load_in_threads(encoder, x, entered, release)
    assert len(calls) == 1
    assert all(isinstance(r, RuntimeError) and "codec failed" in str(r) for r in results)
    monkeypatch.undo()
    assert isinstance(encoder.load(x, 24000), Voice)
