"""Client protocol v1, sans-IO: text/binary frames in, chunks and events out.

One ``ServerProtocol`` per WebSocket session. The adapter (``gateway.py``) feeds it what the
client sent (``receive_text``, ``receive_bytes``) and what the workers answered
(``receive_result``), and sends what it returns. It imports neither trio nor nats, so tests drive
it with no sockets at all.

Rule 1: finals leave in chunk order. A result that arrives early waits in ``_early`` (bounded by
the chunks in flight); a duplicate (a redelivered job answered twice) is ignored.
Rule 2: every bound raises ProtocolError with a code and a close code; nothing is dropped silently.

States: AWAIT_START --start--> STREAMING --stop--> STOPPED --(all chunks answered)--> done.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import soxr

from katydid.audio import CONTAINERS, SAMPLE_RATE, check_pcm_format, pcm16_to_float, to_mono_16k
from katydid.chunker import Chunk, Chunker
from katydid.errors import AudioError, ErrorCode, ProtocolError
from katydid.messages import TASKS, JobResult

if TYPE_CHECKING:
    from katydid.config import Config

PROTOCOL_VERSION = 1
FORMATS = ("pcm_s16le", *CONTAINERS)


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame_bytes: int = 1024 * 1024
    max_session_s: float = 4 * 3600.0
    max_file_bytes: int = 512 * 1024 * 1024
    chunk_min_s: float = 5.0
    file_chunk_min_s: float = 20.0
    chunk_max_s: float = 30.0
    chunk_silence_s: float = 0.3
    bulk_min_audio_s: float = 60.0
    default_max_wait_s: float = 600.0
    partial_interval_s: float = 1.0
    max_prompt_bytes: int = 1024

    @classmethod
    def from_config(cls, cfg: Config) -> Limits:
        """The session bounds out of the configuration (same names, same units)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, slots=True)
class StartOptions:
    format: str
    sample_rate: int
    channels: int
    language: str
    partials: bool
    word_timestamps: bool
    max_wait_s: float
    prompt: str | None
    model: str | None = None  # None: the server's default model
    task: str = "transcribe"

    @classmethod
    def from_message(cls, msg: dict[str, Any], limits: Limits) -> StartOptions:
        """Validate a ``start`` message.

        Raises:
            ProtocolError: a field has the wrong type or value.
        """

        def field_of(name: str, kind: type | tuple[type, ...], default: Any) -> Any:
            value = msg.get(name, default)
            if not isinstance(value, kind) or (
                isinstance(value, bool) and kind in (int, float, (int, float))
            ):
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"start.{name} has the wrong type")
            return value

        fmt = field_of("format", str, "pcm_s16le")
        if fmt not in FORMATS:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_AUDIO, f"format {fmt!r} is not one of {', '.join(FORMATS)}"
            )
        opts = cls(
            format=fmt,
            sample_rate=field_of("sample_rate", int, SAMPLE_RATE),
            channels=field_of("channels", int, 1),
            language=field_of("language", str, "en"),
            partials=field_of("partials", bool, False),
            word_timestamps=field_of("word_timestamps", bool, False),
            max_wait_s=float(field_of("max_wait_s", (int, float), limits.default_max_wait_s)),
            prompt=field_of("prompt", (str, type(None)), None),
            model=field_of("model", (str, type(None)), None),
            task=field_of("task", str, "transcribe"),
        )
        if fmt == "pcm_s16le":
            try:
                check_pcm_format(opts.sample_rate, opts.channels)
            except AudioError as exc:
                raise ProtocolError(ErrorCode.UNSUPPORTED_AUDIO, str(exc)) from None
        if not 1 <= len(opts.language) <= 8:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "start.language must be a language code")
        # "EN", "en-US" and "en_GB" mean Whisper's "en" (whether it exists is the model's call,
        # at admission).
        language = opts.language.lower().replace("_", "-").split("-", 1)[0]
        if language != opts.language:
            opts = dataclasses.replace(opts, language=language)
        if opts.task not in TASKS:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"start.task must be one of {', '.join(TASKS)}"
            )
        if opts.model is not None and not 1 <= len(opts.model) <= 64:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "start.model must be a model name")
        # Bytes, not characters: the prompt travels in a NATS header, where size is bytes.
        if opts.prompt is not None:
            try:
                size = len(opts.prompt.encode("utf-8"))
            except UnicodeEncodeError:  # JSON can carry lone surrogates ("\ud800")
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE, "start.prompt is not valid Unicode text"
                ) from None
            if size > limits.max_prompt_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"start.prompt is {size} bytes (UTF-8); at most {limits.max_prompt_bytes}",
                )
        return opts


class State(Enum):
    AWAIT_START = "await_start"
    STREAMING = "streaming"
    STOPPED = "stopped"


# --- events the server sends -------------------------------------------------------------------


def _dump(d: dict[str, Any]) -> str:
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Ready:
    session_id: str
    model: str = ""  # the model this session's audio goes to
    models: tuple[dict[str, Any], ...] = ()  # what the server offers: name, languages, workers

    def to_json(self) -> str:
        return _dump(
            {
                "type": "ready",
                "session_id": self.session_id,
                "protocol": PROTOCOL_VERSION,
                "model": self.model,
                "models": list(self.models),
            }
        )


@dataclass(frozen=True, slots=True)
class Queued:
    position: int
    eta_s: float

    def to_json(self) -> str:
        return _dump({"type": "queued", "position": self.position, "eta_s": round(self.eta_s, 1)})


@dataclass(frozen=True, slots=True)
class Final:
    seq: int
    start_s: float
    end_s: float
    text: str
    segments: tuple[dict[str, Any], ...]
    kind: str = "final"
    worker: str = ""  # which worker transcribed it: for operators and fan-out diagnostics
    queue_s: float = 0.0  # how long the chunk waited in the queue
    language: str = ""  # what the chunk was decoded as (the detected one with "auto")

    def to_json(self) -> str:
        return _dump(
            {
                "type": self.kind,
                "seq": self.seq,
                "start_s": self.start_s,
                "end_s": self.end_s,
                "text": self.text,
                "segments": list(self.segments),
                "language": self.language,
                "worker": self.worker,
                "queue_s": round(self.queue_s, 3),
            }
        )


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    code: ErrorCode
    message: str
    retry_after_s: float | None = None
    seq: int | None = None  # set for a non-fatal error about one chunk

    def to_json(self) -> str:
        d: dict[str, Any] = {"type": "error", "code": str(self.code), "message": self.message}
        if self.retry_after_s is not None:
            d["retry_after_s"] = round(self.retry_after_s, 1)
        if self.seq is not None:
            d["seq"] = self.seq
        return _dump(d)


@dataclass(frozen=True, slots=True)
class Done:
    chunks: int
    audio_s: float
    failed_chunks: int

    def to_json(self) -> str:
        return _dump(
            {
                "type": "done",
                "chunks": self.chunks,
                "audio_s": round(self.audio_s, 3),
                "failed_chunks": self.failed_chunks,
            }
        )


ServerEvent = Ready | Queued | Final | ErrorEvent | Done


@dataclass(slots=True)
class ServerProtocol:
    """The state of one client session."""

    session_id: str
    limits: Limits = field(default_factory=Limits)
    state: State = State.AWAIT_START
    options: StartOptions | None = None
    _chunker: Chunker | None = None
    # Where an uploaded file's bytes go until stop: the adapter's spooled file (memory up to a
    # bound, then disk), or memory when none is given (tests).
    upload: IO[bytes] = field(default_factory=io.BytesIO)
    _upload_bytes: int = 0
    _pcm_tail: bytes = b""
    _audio_samples: int = 0
    _next_seq: int = 0  # next final to deliver
    _early: dict[int, JobResult] = field(default_factory=dict)
    _failed: int = 0
    _lane: str = "interactive"
    _flushed: bool = False
    _partial_in_flight: bool = False
    _partial_at_s: float = 0.0  # buffered audio when the last partial was taken
    _resampler: Any = None  # soxr.ResampleStream for live PCM not at 16 kHz

    # --- client input ---

    def receive_text(self, text: str) -> str | None:
        """Handle a text frame: ``start`` or ``stop``.

        Returns:
            ``"start"`` or ``"stop"``: what the adapter must act on.

        Raises:
            ProtocolError: malformed JSON, unknown type, or a message out of order.
        """
        if len(text) > self.limits.max_frame_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, "control message too large")
        try:
            msg = json.loads(text)
        except ValueError:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, "control message is not valid JSON"
            ) from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, "control message must be an object with a string 'type'"
            )
        kind = msg["type"]
        if kind == "start":
            if self.state is not State.AWAIT_START:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "start sent twice")
            self.options = StartOptions.from_message(msg, self.limits)
            min_s = (
                self.limits.chunk_min_s
                if self.options.format == "pcm_s16le"
                else self.limits.file_chunk_min_s
            )
            self._chunker = Chunker(
                min_s=min_s, max_s=self.limits.chunk_max_s, silence_s=self.limits.chunk_silence_s
            )
            self.state = State.STREAMING
            return "start"
        if kind == "stop":
            if self.state is not State.STREAMING:
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE, f"stop not allowed in state {self.state.value}"
                )
            self.state = State.STOPPED
            return "stop"
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown message type {kind!r}")

    def receive_bytes(self, data: bytes) -> list[Chunk]:
        """Handle a binary audio frame; returns chunks ready to publish (live PCM only).

        Raises:
            ProtocolError: audio before start or after stop, or a bound exceeded.
        """
        if self.state is not State.STREAMING or self.options is None:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, "audio is only allowed between start and stop"
            )
        if len(data) > self.limits.max_frame_bytes:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"frame of {len(data)} bytes exceeds {self.limits.max_frame_bytes}",
            )
        if self.options.format != "pcm_s16le":
            if self._upload_bytes + len(data) > self.limits.max_file_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE, f"file exceeds {self.limits.max_file_bytes} bytes"
                )
            self.upload.write(data)
            self._upload_bytes += len(data)
            return []
        frame_bytes = 2 * self.options.channels
        data = self._pcm_tail + data
        whole = len(data) - len(data) % frame_bytes
        # Frames may split a sample; the odd bytes wait for the next frame (checked again at stop).
        self._pcm_tail = data[whole:]
        samples = pcm16_to_float(data[:whole], self.options.channels)
        return self._feed(self._resample(samples, last=False))

    def _resample(self, samples: np.ndarray, *, last: bool) -> np.ndarray:
        assert self.options is not None
        if self.options.sample_rate == SAMPLE_RATE:
            return to_mono_16k(samples, SAMPLE_RATE)
        # A stream resampler keeps filter state across frames (no clicks at frame edges).
        if self._resampler is None:
            self._resampler = soxr.ResampleStream(
                self.options.sample_rate, SAMPLE_RATE, 1, dtype="float32"
            )
        mono = samples.mean(axis=1) if samples.ndim == 2 else samples
        out: np.ndarray = self._resampler.resample_chunk(
            np.asarray(mono, dtype=np.float32), last=last
        )
        return out

    def take_file(self) -> IO[bytes]:
        """After stop, for container formats: the uploaded file, rewound, to decode (off the
        event loop); the caller closes it."""
        if not self._upload_bytes:
            raise ProtocolError(ErrorCode.UNSUPPORTED_AUDIO, "audio is empty")
        self.upload.seek(0)
        return self.upload

    def begin_decoded(self, duration_s: float) -> None:
        """The file's length from its header (0 if unknown): long files go to the bulk lane,
        and a file that fits one window is one job (cutting it would cost a second encoder
        pass)."""
        if duration_s >= self.limits.bulk_min_audio_s:
            self._lane = "bulk"
        if 0 < duration_s <= self.limits.chunk_max_s:
            self._chunker = Chunker(min_s=self.limits.chunk_max_s, max_s=self.limits.chunk_max_s)

    def receive_decoded(self, audio: np.ndarray) -> list[Chunk]:
        """A block of the decoded file; returns the chunks it completes (``flush`` ends it)."""
        return self._feed(audio)

    def flush(self) -> list[Chunk]:
        """After stop: the remaining chunks.

        Raises:
            ProtocolError: the PCM stream ended in the middle of a sample frame.
        """
        self._flushed = True
        if self._pcm_tail:
            tail, self._pcm_tail = len(self._pcm_tail), b""
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"PCM stream ended with {tail} stray bytes (odd-length audio)",
            )
        if self._chunker is None:
            return []
        out: list[Chunk] = []
        if self._resampler is not None:
            out = self._feed(self._resample(np.zeros(0, dtype=np.float32), last=True))
        return out + self._chunker.flush()

    def _feed(self, audio: np.ndarray) -> list[Chunk]:
        self._audio_samples += audio.size
        if self._audio_samples / SAMPLE_RATE > self.limits.max_session_s:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"session audio exceeds {self.limits.max_session_s:.0f} s"
            )
        assert self._chunker is not None
        chunks = self._chunker.feed(audio)
        if chunks:
            self._partial_at_s = 0.0  # a new utterance starts: partials restart from it
        return chunks

    # --- partial results ---

    def take_partial(self, *, allowed: bool) -> tuple[int, np.ndarray] | None:
        """Audio of the utterance in progress, if a partial result is due.

        At most one partial is in flight per session, one per ``partial_interval_s`` of new audio;
        ``allowed=False`` (the queue is backed up) skips this one without changing state.

        Returns:
            ``(seq, audio)`` of the chunk in progress, or None.
        """
        if (
            not allowed
            or self._partial_in_flight
            or self.options is None
            or not self.options.partials
        ):
            return None
        if self._chunker is None or self.state is not State.STREAMING:
            return None
        buffered = self._chunker.buffered_s
        if buffered < 1.0 or buffered - self._partial_at_s < self.limits.partial_interval_s:
            return None
        self._partial_in_flight = True
        self._partial_at_s = buffered
        return self._chunker.chunks_emitted, self._chunker.pending_audio()

    def partial_dropped(self) -> None:
        """The partial job could not be queued: the next one may go."""
        self._partial_in_flight = False

    # --- worker results ---

    def receive_result(self, result: JobResult) -> list[ServerEvent]:
        """A worker's result; returns the finals (and chunk errors) now deliverable, in order."""
        if result.kind == "partial":
            self._partial_in_flight = False
            if result.error or not result.text:
                return []
            return (
                [Final(result.seq, 0.0, 0.0, result.text, (), kind="partial")]
                if result.seq >= self._next_seq
                else []
            )
        if result.seq < self._next_seq or result.seq in self._early:
            return []  # a duplicate from a redelivered job
        self._early[result.seq] = result
        out: list[ServerEvent] = []
        while self._next_seq in self._early:
            r = self._early.pop(self._next_seq)
            self._next_seq += 1
            if r.error:
                self._failed += 1
                out.append(
                    ErrorEvent(
                        _code(r.error.get("code", "")),
                        r.error.get("message", "chunk failed"),
                        seq=r.seq,
                    )
                )
                continue
            segs = tuple(s.to_dict() for s in r.segments)
            start = r.segments[0].start_s if r.segments else 0.0
            end = r.segments[-1].end_s if r.segments else 0.0
            if r.text:
                out.append(
                    Final(
                        r.seq,
                        start,
                        end,
                        r.text,
                        segs,
                        worker=r.worker,
                        queue_s=r.queue_s,
                        language=r.language,
                    )
                )
        return out

    # --- queries ---

    @property
    def lane(self) -> str:
        return self._lane

    @property
    def chunks_total(self) -> int:
        return self._chunker.chunks_emitted if self._chunker else 0

    @property
    def chunks_answered(self) -> int:
        return self._next_seq

    @property
    def done(self) -> bool:
        """Stopped, flushed, and every chunk answered."""
        return self.state is State.STOPPED and self._flushed and self._next_seq >= self.chunks_total

    def done_event(self) -> Done:
        return Done(self.chunks_total, self._audio_samples / SAMPLE_RATE, self._failed)


def _code(raw: str) -> ErrorCode:
    if raw in ("expired", "cancelled"):
        return ErrorCode.TIMEOUT
    try:
        return ErrorCode(raw)
    except ValueError:
        return ErrorCode.INTERNAL
