"""What one session may do (``Limits``, from the configuration) and what its client asked for
(``StartOptions``, from its ``start`` message). Plain data, no I/O."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from katydid.audio import CONTAINERS, SAMPLE_RATE, check_pcm_format
from katydid.errors import AudioError, ErrorCode, ProtocolError
from katydid.messages import TASKS

if TYPE_CHECKING:
    from katydid.config import Config

FORMATS = ("pcm_s16le", *CONTAINERS)


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-session bounds, named and measured as in ``Config`` (which holds the defaults:
    build one with ``Limits.from_config``)."""

    max_frame_bytes: int
    max_session_s: float
    max_file_bytes: int
    max_jobs_in_flight: int
    max_prompt_bytes: int
    chunk_min_s: float
    file_chunk_min_s: float
    file_chunk_max_s: float
    chunk_max_s: float
    chunk_silence_s: float
    chunk_pause_s: float
    chunk_live_soft_s: float
    chunk_soft_pause_s: float
    bulk_min_audio_s: float
    default_max_wait_s: float
    partial_interval_s: float
    start_timeout_s: float
    idle_timeout_s: float
    result_timeout_s: float
    job_deadline_s: float
    partial_deadline_s: float
    queued_interval_s: float
    resume_first_partials: int

    @classmethod
    def from_config(cls, cfg: Config) -> Limits:
        """The session bounds out of the configuration (same names, same units)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def default(cls, **overrides: Any) -> Limits:
        """The defaults of ``Config``, with ``overrides``."""
        from katydid.config import Config

        return cls.from_config(Config(**overrides))


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
    # For clients that cannot set a header (browsers); never in a job, a log line or a repr
    api_key: str | None = dataclasses.field(default=None, repr=False)

    @property
    def is_file(self) -> bool:
        """A container file, decoded after ``stop``, not live PCM."""
        return self.format != "pcm_s16le"

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
            max_wait_s=_seconds(field_of("max_wait_s", (int, float), limits.default_max_wait_s)),
            prompt=field_of("prompt", (str, type(None)), None),
            model=field_of("model", (str, type(None)), None),
            task=field_of("task", str, "transcribe"),
            api_key=field_of("api_key", (str, type(None)), None),
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
        if not opts.max_wait_s >= 0:  # also NaN
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "start.max_wait_s must be >= 0")
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


def _seconds(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer of 400 digits: valid JSON, no float
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "start.max_wait_s is out of range") from None
