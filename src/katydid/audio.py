"""Audio input: containers (WAV, FLAC, OGG, MP3) and raw ``pcm_s16le`` to 16 kHz mono float32.

Every failure raises ``AudioError`` with a message a client can act on; a library error never
escapes, and nothing here can hang (decoding is bounded by the input's size, which the caller
bounds with ``max_bytes``, and by ``max_audio_s``).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import IO

import numpy as np
import soundfile as sf
import soxr

from katydid.errors import AudioError

SAMPLE_RATE = 16_000  # what all audio becomes here, and every job body: s16le, 16 kHz, mono
BYTES_PER_S = 2 * SAMPLE_RATE  # of s16le at SAMPLE_RATE

CONTAINERS = ("wav", "flac", "ogg", "mp3")
# libsndfile's format names for the containers we accept.
_SF_FORMATS = {
    "WAV": "wav",
    "WAVEX": "wav",
    "RF64": "wav",
    "W64": "wav",
    "FLAC": "flac",
    "OGG": "ogg",
    "MP3": "mp3",
}
_MAX_RATE = 384_000
_MAX_CHANNELS = 32


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mix ``(frames,)`` or ``(frames, channels)`` float samples to mono and resample to 16 kHz."""
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    mono = _finite(np.asarray(mono, dtype=np.float32))
    if sample_rate != SAMPLE_RATE and mono.size:
        mono = soxr.resample(mono, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    out: np.ndarray = np.clip(mono, -1.0, 1.0)
    return out


def _finite(samples: np.ndarray) -> np.ndarray:
    """NaN as silence and infinities as full scale: a float file may hold them, and they went
    on into the resampler (a NaN spreads over its whole filter) and the int16 cast (numpy's
    RuntimeWarning printed raw on stderr, outside the structured log)."""
    if np.isfinite(samples).all():
        return samples
    out: np.ndarray = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    return out


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] (clipped) to int16, rounded at the scale (32768) that
    ``pcm16_to_float`` divides by: the two are exact inverses on 16-bit audio."""
    scaled = np.rint(_finite(np.asarray(samples, dtype=np.float32)) * np.float32(32768.0))
    out: np.ndarray = np.clip(scaled, -32768.0, 32767.0).astype(np.int16)
    return out


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] (clipped) to s16le bytes: the inverse of ``pcm16_to_float``."""
    return float_to_int16(samples).astype("<i2", copy=False).tobytes()


def pcm16_mono(data: bytes, channels: int = 1) -> np.ndarray:
    """Interleaved s16le bytes (a whole number of frames) to mono int16: the channels' mean,
    rounded; mono audio is only reinterpreted, never converted."""
    samples = np.frombuffer(data, dtype="<i2")
    if channels == 1:
        return samples.astype(np.int16, copy=False)
    mixed = samples.reshape(-1, channels).astype(np.int32).sum(axis=1)
    out: np.ndarray = np.rint(mixed / channels).astype(np.int16)
    return out


def pcm16_to_float(data: bytes, channels: int = 1) -> np.ndarray:
    """Interleaved s16le bytes to float32 ``(frames, channels)`` (or ``(frames,)`` for mono).

    Raises:
        AudioError: the byte count is not a whole number of frames.
    """
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        raise AudioError(
            f"pcm_s16le data of {len(data)} bytes is not a whole number of {frame_bytes}-byte frames"
        )
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return samples if channels == 1 else samples.reshape(-1, channels)


def decode_pcm(data: bytes, *, sample_rate: int, channels: int, max_audio_s: float) -> np.ndarray:
    """Decode raw ``pcm_s16le`` to 16 kHz mono float32.

    Raises:
        AudioError: bad parameters, partial frames, empty or too long audio.
    """
    check_pcm_format(sample_rate, channels)
    if not data:
        raise AudioError("audio is empty")
    duration_s = len(data) / (2 * channels * sample_rate)
    if duration_s > max_audio_s:
        raise AudioError(
            f"audio lasts {duration_s:.0f} s, more than the {max_audio_s:.0f} s allowed"
        )
    return to_mono_16k(pcm16_to_float(data, channels), sample_rate)


def check_pcm_format(sample_rate: int, channels: int) -> None:
    """Raises AudioError unless the rate and channel count are plausible for speech."""
    if not (isinstance(sample_rate, int) and 4_000 <= sample_rate <= _MAX_RATE):
        raise AudioError(
            f"sample_rate must be an integer in 4000..{_MAX_RATE}, got {_shown(sample_rate)}"
        )
    if not (isinstance(channels, int) and 1 <= channels <= _MAX_CHANNELS):
        raise AudioError(
            f"channels must be an integer in 1..{_MAX_CHANNELS}, got {_shown(channels)}"
        )


def _shown(value: object) -> str:
    """A client's value in a message: not all 400 digits of it."""
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


# What an open decoder holds besides the samples it hands out: libsndfile's state and buffers
# for the container, and soxr's filter when the file is resampled. Measured per open file after
# its first read (soundfile 0.14, libsndfile 1.2.2, soxr 1.1, 500 in-memory 3 s files): WAV
# 14-16 KB, MP3 66 KB, FLAC 165 KB, OGG/Vorbis 180 KB; a soxr HQ stream 118 KB. Rounded up.
_DECODER_BYTES = {"wav": 16 << 10, "mp3": 64 << 10, "flac": 192 << 10, "ogg": 192 << 10}
_RESAMPLER_BYTES = 128 << 10
_BLOCK_S = 10.0
# A block's frames as read (float32 per channel) are bounded in bytes too: 10 s of a 32-channel
# 384 kHz file would be 491 MB (one such 245 MB upload took a gateway from 88 to 590 MB).
_MAX_BLOCK_BYTES = 2 << 20


def first_block_bytes(upload: IO[bytes]) -> int:
    """A guess, before ``upload`` is opened, at what ``DecodedStream`` takes to open it and
    decode its first block (what ``next_block_bytes`` says once it is open): the decoder its
    first bytes announce (the largest one if they announce none) and 16 kHz mono int16 samples
    for a block, or for the whole file if it is smaller. Enough for what most clients send (a
    16 kHz mono 16-bit WAV: its header's bytes over); the rest is known once it is open."""
    upload.seek(0)
    head = upload.read(12)
    size = upload.seek(0, io.SEEK_END)
    upload.seek(0)
    container = sniff_container(head)
    decoder = _DECODER_BYTES[container] if container else max(_DECODER_BYTES.values())
    return decoder + min(size, int(_BLOCK_S * SAMPLE_RATE) * 2)


class DecodedStream:
    """A container file decoded block by block to 16 kHz mono float32.

    What a session holds while a long upload is decoded and cut is one block (and the resampler's
    state), not the whole file's samples: 100 MB of WAV decodes to ~200 MB of float32.

    Args:
        source: the file (a path, or a seekable binary file object such as the gateway's spooled
            upload).
        max_audio_s: longer audio is an AudioError (checked from the header, and again as
            samples arrive, for containers whose header does not say).
        block_s: audio read per block.

    Raises:
        AudioError: not audio, of another format, too long, or truncated.
    """

    def __init__(
        self, source: Path | IO[bytes], *, max_audio_s: float, block_s: float = _BLOCK_S
    ) -> None:
        self._max_audio_s = max_audio_s
        try:
            self._file = sf.SoundFile(source)
        except Exception as exc:  # libsndfile reports garbage as LibsndfileError, RuntimeError...
            # "Error opening <_io.BytesIO object at 0x...>: Format not recognised." -> the cause.
            cause = re.sub(r"^Error opening .*?: ", "", str(exc))
            raise AudioError(
                f"not a decodable audio file ({', '.join(CONTAINERS)}): {cause}".rstrip(": ")
            ) from exc
        f = self._file
        if f.format not in _SF_FORMATS:
            f.close()
            raise AudioError(
                f"unsupported container {f.format}; supported: {', '.join(CONTAINERS)}"
            )
        self.rate = int(f.samplerate)
        if not (4_000 <= self.rate <= _MAX_RATE and 1 <= f.channels <= _MAX_CHANNELS):
            f.close()
            raise AudioError(
                f"the file's format ({self.rate} Hz, {f.channels} channels) is outside what is"
                f" decoded: 4000..{_MAX_RATE} Hz, 1..{_MAX_CHANNELS} channels"
            )
        # From the header; 0 when the container does not say (some MP3 and OGG files).
        self.duration_s = f.frames / f.samplerate if f.frames > 0 else 0.0
        if self.duration_s > max_audio_s:
            f.close()
            raise AudioError(
                f"audio lasts {self.duration_s:.0f} s, more than the {max_audio_s:.0f} s allowed"
            )
        self.channels = int(f.channels)
        self._block = max(1, min(int(block_s * self.rate), _MAX_BLOCK_BYTES // (4 * self.channels)))
        self._resampler = (
            soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            if self.rate != SAMPLE_RATE
            else None
        )
        self._frames_read = 0
        self._done = False
        # 16 kHz mono 16-bit PCM (what most clients send) is read as it is stored: the same
        # samples the float path gives, without three conversions of every one of them.
        self._native = self._resampler is None and f.channels == 1 and f.subtype == "PCM_16"
        self.decoder_bytes = _DECODER_BYTES[_SF_FORMATS[f.format]] + (
            _RESAMPLER_BYTES if self._resampler is not None else 0
        )

    def __enter__(self) -> DecodedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def exhausted(self) -> bool:
        """Every block has been read: the decoder is no longer needed."""
        return self._done

    def next_block_bytes(self) -> int:
        """About the most memory the next block takes while it is decoded: the open decoder's
        own (``decoder_bytes``), the block's frames as read (int16 when read as stored, else
        float32 per channel) and its 16 kHz int16 samples."""
        if self._done:
            return 0
        frames = self._block
        if self.duration_s > 0:  # the last block is the rest of the file
            left = round(self.duration_s * self.rate) - self._frames_read
            frames = max(0, min(frames, left))
        out = 2 * frames * SAMPLE_RATE // self.rate + self.decoder_bytes
        return out if self._native else frames * self.channels * 4 + out

    def next_pcm16(self) -> np.ndarray | None:
        """The next block as 16 kHz mono int16 samples (possibly empty), or None at the end.

        Raises:
            AudioError: as ``next_block``.
        """
        if not self._native:
            block = self.next_block()
            return None if block is None else float_to_int16(block)
        if self._done:
            return None
        samples = self._read("int16")
        out: np.ndarray = samples[:, 0]
        return out

    def next_block(self) -> np.ndarray | None:
        """The next block of 16 kHz mono float32 samples (possibly empty), or None at the end.

        Raises:
            AudioError: the file is truncated or corrupt past its header, holds no samples, or
                lasts longer than allowed.
        """
        if self._done:
            return None
        samples = self._read("float32")
        mono = _finite(np.asarray(samples.mean(axis=1), dtype=np.float32))
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono, last=self._done)
        out: np.ndarray = np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)
        return out

    def _read(self, dtype: str) -> np.ndarray:
        """The next block of frames, ``(frames, channels)``; past the last, ``_done``.

        Raises:
            AudioError: as ``next_block``.
        """
        try:
            samples: np.ndarray = self._file.read(self._block, dtype=dtype, always_2d=True)
        except Exception as exc:
            raise AudioError(f"audio file is corrupt or truncated: {exc}") from exc
        self._frames_read += samples.shape[0]
        if self._frames_read / self.rate > self._max_audio_s:
            raise AudioError(f"audio lasts more than the {self._max_audio_s:.0f} s allowed")
        if samples.shape[0] < self._block:
            self._done = True
            if self._frames_read == 0:
                raise AudioError("audio file holds no samples")
        return samples


def decode_container(data: bytes | Path, *, max_audio_s: float, max_bytes: int) -> np.ndarray:
    """Decode a WAV, FLAC, OGG or MP3 file (bytes or a path) to 16 kHz mono float32, whole.

    The same decoder as the gateway's block by block one (``DecodedStream``), so a file gives
    the same samples either way.

    Raises:
        AudioError: the input is too large, empty, not audio, of another format, or too long.
    """
    if isinstance(data, Path):
        try:
            size = data.stat().st_size
        except OSError as exc:
            raise AudioError(f"cannot read it: {exc.strerror or exc}") from exc
        if data.is_dir():
            raise AudioError("it is a directory, not an audio file")
        try:
            with data.open("rb"):  # libsndfile says only "System error" for one it may not read
                pass
        except OSError as exc:
            raise AudioError(f"cannot read it: {exc.strerror or exc}") from exc
        source: Path | IO[bytes] = data
    else:
        size = len(data)
        source = io.BytesIO(data)
    if size == 0:
        raise AudioError("audio is empty")
    if size > max_bytes:
        raise AudioError(f"file is {size} bytes, more than the {max_bytes} allowed")
    blocks = []
    with DecodedStream(source, max_audio_s=max_audio_s) as stream:
        while (block := stream.next_block()) is not None:
            blocks.append(block)
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)


def sniff_container(head: bytes) -> str | None:
    """Guess a container from its first bytes: ``wav``, ``flac``, ``ogg``, ``mp3`` or None."""
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return None
