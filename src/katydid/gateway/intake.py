"""A session's audio on its way to chunks, sans-IO: live PCM frames, or an upload kept until
``stop`` and then its decoded blocks; every bound of ``Limits`` on audio is checked here.

Samples are int16 from here to the job's body: live PCM is only reinterpreted (and mixed or
resampled if it is not 16 kHz mono), a decoded file is quantised once.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import soxr

from katydid.audio import SAMPLE_RATE, pcm16_mono
from katydid.chunker import Chunk, Chunker
from katydid.errors import ErrorCode, ProtocolError
from katydid.gateway.options import Limits, StartOptions


@dataclass(slots=True)
class AudioIntake:
    limits: Limits
    options: StartOptions
    chunker: Chunker = field(init=False)
    # Where an uploaded file's bytes wait until stop: the gateway's spooled file (memory up to
    # a bound, then disk), or memory when none is given.
    upload: IO[bytes] = field(default_factory=io.BytesIO)
    lane: str = "interactive"
    _upload_bytes: int = 0
    _pcm_tail: bytes = b""
    _resampler: Any = None  # soxr.ResampleStream for live PCM not at 16 kHz
    _samples: int = 0
    _partial_at: int = 0  # samples buffered when the last partial was taken
    # A resumed session: (next chunk seq, samples already in jobs); a file's decoded samples
    # before that point are skipped (the client sends the whole file again)
    _resumed: tuple[int, int] | None = None
    _skip: int = 0

    def __post_init__(self) -> None:
        lim = self.limits
        if self.options.is_file:
            self.chunker = Chunker(
                min_s=lim.file_chunk_min_s,
                max_s=lim.file_chunk_max_s,
                silence_s=lim.chunk_silence_s,
                longest_pause=True,
            )
        else:  # live: cut as soon as the speaker pauses (chunker.py)
            self.chunker = Chunker(
                min_s=lim.chunk_min_s,
                max_s=lim.chunk_max_s,
                silence_s=lim.chunk_pause_s,
                eager=True,
                vad=True,
                soft_max_s=lim.chunk_live_soft_s,
                soft_pause_s=lim.chunk_soft_pause_s,
            )

    def resume_at(self, seq: int, samples: int) -> None:
        """Take over a session whose first ``samples`` (16 kHz) are in ``seq`` jobs already:
        live PCM resent from there goes on from there; a file sent again skips them."""
        self._resumed = (seq, samples)
        self.chunker.resume_at(seq, samples)
        self._samples = samples
        if self.options.is_file:
            self._skip = samples

    def frame(self, data: bytes, message_bytes: int | None = None) -> list[Chunk]:
        """A binary frame (or a piece of one, ``message_bytes`` long so far): the chunks live PCM
        completes (a file's bytes are kept).

        Raises:
            ProtocolError: a bound is exceeded.
        """
        size = len(data) if message_bytes is None else message_bytes
        if size > self.limits.max_frame_bytes:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"frame of {'more than ' if message_bytes is not None else ''}{size} bytes "
                f"exceeds {self.limits.max_frame_bytes}",
            )
        if self.options.is_file:
            if self._upload_bytes + len(data) > self.limits.max_file_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE, f"file exceeds {self.limits.max_file_bytes} bytes"
                )
            try:
                self.upload.write(data)
            except OSError as exc:  # its temporary file: $TMPDIR full or not writable
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f"the gateway has no room for the upload ({exc.strerror or exc})",
                    retry_after_s=30.0,
                ) from exc
            self._upload_bytes += len(data)
            return []
        frame_bytes = 2 * self.options.channels
        data = self._pcm_tail + data
        whole = len(data) - len(data) % frame_bytes
        # Frames may split a sample; the odd bytes wait for the next frame (checked at the end).
        self._pcm_tail = data[whole:]
        return self._feed(self._resample(pcm16_mono(data[:whole], self.options.channels)))

    def _resample(self, samples: np.ndarray, *, last: bool = False) -> np.ndarray:
        if self.options.sample_rate == SAMPLE_RATE:
            return samples
        # A stream resampler keeps filter state across frames (no clicks at frame edges).
        if self._resampler is None:
            self._resampler = soxr.ResampleStream(
                self.options.sample_rate, SAMPLE_RATE, 1, dtype="int16"
            )
        out: np.ndarray = self._resampler.resample_chunk(samples, last=last)
        return out

    def adopt(self, upload: IO[bytes], size: int) -> None:
        """A door that received the whole file (an HTTP form) hands it over as the upload.

        Raises:
            ProtocolError: over ``max_file_bytes``.
        """
        if size > self.limits.max_file_bytes:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"file of {size} bytes exceeds {self.limits.max_file_bytes}"
            )
        self.upload.close()
        self.upload = upload
        self._upload_bytes = size

    def stored_upload(self) -> IO[bytes]:
        """At stop, for a file: the upload, rewound, to decode.

        Raises:
            ProtocolError: nothing was uploaded.
        """
        if not self._upload_bytes:
            raise ProtocolError(ErrorCode.UNSUPPORTED_AUDIO, "audio is empty")
        self.upload.seek(0)
        return self.upload

    def file_length(self, duration_s: float) -> None:
        """The file's length from its header (0 if unknown): long files go to the bulk lane,
        and a file that fits one window is one job (cutting it would cost a second encoder
        pass)."""
        if duration_s >= self.limits.bulk_min_audio_s:
            self.lane = "bulk"
        if 0 < duration_s <= self.limits.chunk_max_s:
            self.chunker = Chunker(min_s=self.limits.chunk_max_s, max_s=self.limits.chunk_max_s)
            if self._resumed is not None:
                self.chunker.resume_at(*self._resumed)

    def block(self, audio: np.ndarray) -> list[Chunk]:
        """A decoded block of the file (16 kHz mono int16): the chunks it completes."""
        if self._skip:  # a resumed session's file, sent again: what is in jobs already
            dropped = min(self._skip, audio.size)
            self._skip -= dropped
            audio = audio[dropped:]
            if not audio.size:
                return []
        return self._feed(audio)

    def end(self) -> list[Chunk]:
        """The audio is over: the last chunks.

        Raises:
            ProtocolError: live PCM ended in the middle of a sample frame.
        """
        if self._pcm_tail:
            tail, self._pcm_tail = len(self._pcm_tail), b""
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"PCM stream ended with {tail} stray bytes (odd-length audio)",
            )
        out: list[Chunk] = []
        if self._resampler is not None:
            out = self._feed(self._resample(np.zeros(0, dtype=np.int16), last=True))
        return out + self.chunker.flush()

    def _feed(self, audio: np.ndarray) -> list[Chunk]:
        self._samples += audio.size
        if self._samples / SAMPLE_RATE > self.limits.max_session_s:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"session audio exceeds {self.limits.max_session_s:.0f} s"
            )
        chunks = self.chunker.feed(audio)
        if chunks:
            self._partial_at = 0  # a new utterance starts: partials restart from it
        return chunks

    def partial_audio(self) -> tuple[int, np.ndarray] | None:
        """``(seq, samples)`` of the utterance in progress if a partial is due: one per
        ``partial_interval_s`` of new audio, from 1 s on."""
        # Counted in samples: in seconds, (k + 9) frames of 0.1 s minus k frames fell short of
        # 0.9 for half of all k, and a partial due every 0.9 s came every 1.0 s.
        buffered = self.chunker.buffered_samples
        interval = round(self.limits.partial_interval_s * SAMPLE_RATE)
        if buffered < SAMPLE_RATE or buffered - self._partial_at < interval:
            return None
        if not self.chunker.has_speech():
            return None  # nobody speaks yet: a partial could only be text nobody said
        self._partial_at = buffered
        return self.chunker.chunks_emitted, self.chunker.pending_audio()

    @property
    def audio_s(self) -> float:
        return self._samples / SAMPLE_RATE
