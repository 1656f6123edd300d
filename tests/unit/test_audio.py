"""Audio decoding: each container, raw PCM, and every kind of bad input."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from katydid.audio import (
    SAMPLE_RATE,
    DecodedStream,
    decode_container,
    decode_pcm,
    first_block_bytes,
    float_to_int16,
    float_to_pcm16,
    pcm16_to_float,
    sniff_container,
)
from katydid.errors import AudioError

LIMITS: dict[str, Any] = {"max_audio_s": 60.0, "max_bytes": 10_000_000}


def _tone(rate: int, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def _encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [
        ("WAV", "PCM_16"),
        ("WAV", "FLOAT"),
        ("FLAC", None),
        ("OGG", "VORBIS"),
        ("MP3", "MPEG_LAYER_III"),
    ],
)
def test_each_container_decodes_to_16k_mono(fmt: str, subtype: str | None) -> None:
    data = _encode(_tone(44_100, 1.0, channels=2), 44_100, fmt, subtype)
    audio = decode_container(data, **LIMITS)
    assert audio.dtype == np.float32
    assert audio.ndim == 1
    # Lossy codecs pad a little; the duration is still about one second at 16 kHz.
    assert abs(audio.size - SAMPLE_RATE) < 0.1 * SAMPLE_RATE
    assert sniff_container(data[:16]) == fmt.lower()
    # The tone survives: its RMS is close to 0.5/sqrt(2).
    assert float(np.sqrt(np.mean(audio[2000:14000] ** 2))) == pytest.approx(0.3536, rel=0.1)


def test_decode_from_path(tmp_path: Path) -> None:
    path = tmp_path / "a.flac"
    path.write_bytes(_encode(_tone(16_000), 16_000, "FLAC"))
    assert decode_container(path, **LIMITS).size == SAMPLE_RATE


def test_raw_pcm_stereo_8k_resampled() -> None:
    samples = (_tone(8_000, 0.5, channels=2) * 32767).astype("<i2")
    audio = decode_pcm(samples.tobytes(), sample_rate=8_000, channels=2, max_audio_s=60)
    assert audio.size == SAMPLE_RATE // 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is not audio at all, just text" * 10, "not a decodable audio file"),
        (bytes(range(256)) * 40, "not a decodable audio file"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "not a decodable audio file"),  # truncated header
    ],
)
def test_bad_containers_raise_audio_error(data: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=message) as caught:
        decode_container(data, **LIMITS)
    assert "object at 0x" not in str(caught.value)  # the client hears the cause, not our repr


def test_unsupported_container_is_named() -> None:
    data = _encode(_tone(16_000), 16_000, "AIFF")
    with pytest.raises(AudioError, match="unsupported container AIFF"):
        decode_container(data, **LIMITS)


def test_truncated_wav_body_decodes_what_is_there() -> None:
    data = _encode(_tone(16_000, 1.0), 16_000, "WAV", "PCM_16")
    audio = decode_container(data[: len(data) // 2], **LIMITS)
    assert 0 < audio.size < SAMPLE_RATE


def test_bounds_are_enforced() -> None:
    data = _encode(_tone(16_000, 2.0), 16_000, "WAV", "PCM_16")
    with pytest.raises(AudioError, match="more than the 1 s allowed"):
        decode_container(data, max_audio_s=1.0, max_bytes=10_000_000)
    with pytest.raises(AudioError, match="bytes, more than"):
        decode_container(data, max_audio_s=60.0, max_bytes=1000)
    with pytest.raises(AudioError, match="more than the 1 s allowed"):
        decode_pcm(b"\0\0" * 32_000, sample_rate=16_000, channels=1, max_audio_s=1.0)


def test_pcm_partial_frames_and_bad_formats() -> None:
    with pytest.raises(AudioError, match="whole number"):
        pcm16_to_float(b"\0\0\0", 1)
    with pytest.raises(AudioError, match="whole number"):
        pcm16_to_float(b"\0\0", 2)
    with pytest.raises(AudioError, match="sample_rate"):
        decode_pcm(b"\0\0", sample_rate=100, channels=1, max_audio_s=1)
    with pytest.raises(AudioError, match="channels"):
        decode_pcm(b"\0\0", sample_rate=16_000, channels=0, max_audio_s=1)
    with pytest.raises(AudioError, match="empty"):
        decode_pcm(b"", sample_rate=16_000, channels=1, max_audio_s=1)


def test_missing_file_is_an_audio_error(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="cannot read"):
        decode_container(tmp_path / "nope.wav", **LIMITS)


def test_float_to_pcm16_is_the_inverse_of_pcm16_to_float_and_clips() -> None:
    samples = np.array([0.0, 0.5, -0.5, 0.999, -0.999], dtype=np.float32)
    back = pcm16_to_float(float_to_pcm16(samples))
    assert np.max(np.abs(back - samples)) < 1e-4
    loud = pcm16_to_float(float_to_pcm16(np.array([2.0, -2.0], dtype=np.float32)))
    assert np.allclose(loud, [32767 / 32768, -1.0])


def test_16_bit_audio_survives_the_trip_to_the_worker_bit_exact() -> None:
    # Every int16 value: s16le -> float (gateway decode) -> s16le (job body) -> float (worker).
    pcm = np.arange(-32768, 32768, dtype="<i2").tobytes()
    once = pcm16_to_float(pcm)
    assert float_to_pcm16(once) == pcm
    assert np.array_equal(pcm16_to_float(float_to_pcm16(once)), once)
    assert float_to_pcm16(np.array([1000 / 32768], dtype=np.float32)) == (1000).to_bytes(
        2, "little"
    )


def _blocks(next_block: Callable[[], np.ndarray | None]) -> list[np.ndarray]:
    blocks = []
    while (block := next_block()) is not None:
        blocks.append(block)
    return blocks


@pytest.mark.parametrize(
    ("rate", "channels", "subtype"),
    [(16_000, 1, "PCM_16"), (16_000, 1, "FLOAT"), (44_100, 2, "PCM_16"), (16_000, 2, "PCM_16")],
)
def test_the_gateways_int16_blocks_are_the_float_paths_samples(
    rate: int, channels: int, subtype: str
) -> None:
    # 16 kHz mono 16-bit files are read as stored; every other file goes through float. Both
    # give what the float decoder gives, rounded to int16: bit for bit, whichever path.
    rng = np.random.default_rng(7)
    samples = rng.integers(-32768, 32768, size=(3 * rate, channels), dtype=np.int16)
    data = _encode(samples, rate, "WAV", subtype)
    with DecodedStream(io.BytesIO(data), max_audio_s=60.0, block_s=1.0) as stream:
        ints = _blocks(stream.next_pcm16)
    with DecodedStream(io.BytesIO(data), max_audio_s=60.0, block_s=1.0) as stream:
        floats = _blocks(stream.next_block)
    assert [b.dtype for b in ints] == [np.dtype(np.int16)] * len(floats)
    got, want = np.concatenate(ints), float_to_int16(np.concatenate(floats))
    assert np.array_equal(got, want)
    if (rate, channels, subtype) == (16_000, 1, "PCM_16"):
        assert np.array_equal(got, samples[:, 0])  # the file's own samples


@pytest.mark.parametrize(
    ("rate", "channels", "fmt", "subtype"),
    [
        (16_000, 1, "WAV", "PCM_16"),
        (44_100, 2, "WAV", "PCM_16"),
        (16_000, 1, "FLAC", "PCM_16"),
        (22_050, 1, "OGG", "VORBIS"),
        (16_000, 1, "MP3", "MPEG_LAYER_III"),
    ],
)
def test_the_guess_before_opening_covers_what_the_open_decoder_says_for_a_16k_mono_wav(
    rate: int, channels: int, fmt: str, subtype: str
) -> None:
    # The gateway takes its window share before opening a file (an open decoder costs memory
    # too): enough for what most clients send (give or take the header), and never more than
    # one re-queue otherwise.
    data = _encode(_tone(rate, 3.0, channels), rate, fmt, subtype)
    guess = first_block_bytes(io.BytesIO(data))
    with DecodedStream(io.BytesIO(data), max_audio_s=60.0) as stream:
        known = stream.next_block_bytes()
        assert known >= stream.decoder_bytes > 0
    if (rate, channels, fmt) == (16_000, 1, "WAV"):
        assert known <= guess <= known + 1024
    assert guess > 0
    assert first_block_bytes(io.BytesIO(b"not audio at all")) > len(b"not audio at all")


def test_a_block_is_bounded_in_bytes_whatever_the_rate_and_channels() -> None:
    # 10 s of a 32-channel 384 kHz file would be a 491 MB block; blocks stay ~2 MiB, and the
    # file decodes to the same samples as with one block per 10 s.
    rate, channels, seconds = 384_000, 8, 1.5
    data = _encode(_tone(rate, seconds, channels), rate, "WAV", "PCM_16")
    with DecodedStream(io.BytesIO(data), max_audio_s=60.0) as stream:
        assert stream.next_block_bytes() <= (2 << 20) + stream.decoder_bytes + 2 * SAMPLE_RATE
        small = _blocks(stream.next_pcm16)
    assert len(small) > 2
    with DecodedStream(io.BytesIO(data), max_audio_s=60.0) as stream:
        stream._block = 10 * rate  # as it was: the whole file in one block
        whole = _blocks(stream.next_pcm16)
    assert np.array_equal(np.concatenate(small), np.concatenate(whole))


@pytest.mark.parametrize(("rate", "channels"), [(1_000, 1), (500_000, 1)])
def test_a_file_outside_the_decoded_rates_is_refused_in_words(rate: int, channels: int) -> None:
    data = _encode(_tone(rate, 0.5, channels), rate, "WAV", "PCM_16")
    with pytest.raises(AudioError, match=rf"\({rate} Hz, {channels} channels\) is outside"):
        DecodedStream(io.BytesIO(data), max_audio_s=60.0)


def test_a_directory_or_a_missing_path_is_said_in_words(tmp_path: Path) -> None:
    # A directory was libsndfile's "Format not recognised"; the caller names the path.
    with pytest.raises(AudioError, match=r"^it is a directory, not an audio file$"):
        decode_container(tmp_path, max_audio_s=60, max_bytes=1 << 20)
    with pytest.raises(AudioError, match=r"^cannot read it: No such file or directory$"):
        decode_container(tmp_path / "none.wav", max_audio_s=60, max_bytes=1 << 20)


def test_a_file_that_is_not_audio_is_said_once() -> None:
    # `katydid transcribe` prefixes the path: the message must not carry it again.
    from katydid.cli_client import file_format
    from katydid.errors import KatydidError

    with pytest.raises(KatydidError, match=r"^not a WAV, FLAC, OGG or MP3 file"):
        file_format(Path("garbage/random.wav"), b"\x8f\x13random bytes")


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("rate", [16_000, 44_100])
def test_nan_and_infinite_float_samples_are_silence_and_full_scale(rate: int) -> None:
    # A float WAV may hold NaN or inf: numpy's cast warning was printed raw on stderr, and a
    # NaN spread through the resampler's filter; now NaN is silence, inf full scale.
    samples = np.full(rate, 0.25, dtype=np.float32)
    samples[100:200] = np.nan
    samples[300] = np.inf
    samples[400] = -np.inf
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="FLOAT")
    data = buf.getvalue()
    whole = decode_container(data, max_audio_s=60.0, max_bytes=10**7)
    with DecodedStream(io.BytesIO(data), max_audio_s=60.0, block_s=1.0) as stream:
        blocks = []
        while (block := stream.next_block()) is not None:
            blocks.append(block)
    streamed = np.concatenate(blocks)
    for decoded in (whole, streamed):
        assert np.isfinite(decoded).all()
        assert np.abs(decoded).max() <= 1.0
        assert abs(float(np.median(decoded)) - 0.25) < 0.01  # the rest is untouched
    assert np.isfinite(pcm16_to_float(float_to_pcm16(np.array([np.nan, np.inf])))).all()
