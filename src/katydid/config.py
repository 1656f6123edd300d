"""Katydid's configuration: one immutable, typed object.

Sources, later ones winning: defaults here → a TOML file (``--config`` or ``KATYDID_CONFIG``) →
``KATYDID_<FIELD>`` environment variables → explicit overrides (command-line flags). Every bound
has a default and a name with its unit. The object is passed down explicitly; there is no global.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from katydid.errors import ConfigError

ENV_PREFIX = "KATYDID_"


def _default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("katydid"))


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("katydid"))


# Q8_0 weights: measured faster than f16 at equal or better WER on the shared clips (docs/engine.md,
# weights table), and 44 MB instead of 78 MB. ``tiny.en`` names the f16 model.
DEFAULT_MODEL = "tiny.en-q8_0"


@dataclass(frozen=True, slots=True)
class Config:
    """All of Katydid's settings. Field names carry their units."""

    # Model and engine
    model: str = DEFAULT_MODEL
    model_dir: Path = field(default_factory=_default_cache_dir)
    language: str = "en"
    engine_threads: int = 1
    beam_size: int = 0  # 0 = greedy decoding
    word_timestamps: bool = False
    # An engine (a worker's, `katydid transcribe`'s) reads back the calibration this host measured
    # before for its model and options (calibration/ beside the model); False: every engine
    # measures it again (~5-7 CPU s for tiny.en)
    calibration_cache: bool = True
    # Finals of speech too long for one clip-sized window (over ~11.8 s) decoded in clip-sized
    # pieces cut at its pauses instead of the full window: ~1.5x faster on the bench's 12-30 s
    # utterances (AMD EPYC), a word or two in 200 heard differently. Partials always are.
    engine_pieces: bool = False
    # Audio input
    max_audio_s: float = 4 * 3600.0
    max_file_bytes: int = 512 * 1024 * 1024
    # An uploaded file is held in memory up to this, the rest in a temporary file, until it is
    # decoded (block by block) after stop
    upload_memory_bytes: int = 4 * 1024 * 1024
    # ...and all uploads together up to this (gateway-wide); past it, uploads go to disk
    upload_memory_total_bytes: int = 16 * 1024 * 1024
    # Uploaded audio being decoded and published, gateway-wide (gateway/window.py): past it,
    # uploads wait their turn to be decoded
    publish_window_bytes: int = 16 * 1024 * 1024
    # The gateway's buffers of at least this size are mapped apart and returned to the system
    # when freed (glibc; heap.py); 0 = glibc's own, rising threshold
    malloc_mmap_threshold_bytes: int = 32 * 1024
    # Every this often the gateway gives the free pages inside its heap back (0 = never)
    malloc_trim_interval_s: float = 10.0
    # Processes
    data_dir: Path = field(default_factory=_default_data_dir)
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    log_sample_burst: int = 5  # lines per repeating event per window
    log_sample_window_s: float = 10.0
    # Gateway (no connection-count limit exists, by design)
    host: str = "127.0.0.1"
    port: int = 8765
    # SO_REUSEPORT on the WebSocket port: several gateway processes on one host share it
    reuse_port: bool = False
    max_frame_bytes: int = 1024 * 1024  # one WebSocket message
    max_session_s: float = 4 * 3600.0  # audio per session
    max_jobs_in_flight: int = (
        64  # unanswered chunks per session; beyond it the gateway stops reading
    )
    handshake_timeout_s: float = 10.0
    start_timeout_s: float = 30.0  # connect → start message
    idle_timeout_s: float = 120.0  # no frame while streaming
    # An HTTP upload's body must average at least this many bytes/s once the grace is over
    # (trickling bodies held connections for good); 408 when it falls under.
    upload_min_bytes_per_s: int = 1024
    upload_rate_grace_s: float = 10.0
    result_timeout_s: float = 900.0  # after stop: no result for this long
    send_timeout_s: float = 30.0  # a client that does not read
    shutdown_grace_s: float = 30.0
    queue_poll_s: float = 1.0
    queued_interval_s: float = 2.0  # least time between two `queued` updates to a session
    # New audio between two partial results of a session: 0.9 s, so that with their decoding
    # time (which grows with the utterance) results still come at least once a second.
    partial_interval_s: float = 0.9
    partial_deadline_s: float = 5.0  # a partial job not started by then is skipped
    default_max_wait_s: float = 600.0  # longest wait for a worker, else 'overloaded'
    # start.prompt, UTF-8 bytes (it travels in a NATS header); whisper uses at most 224 tokens
    # of it, about 1 KB of English text
    max_prompt_bytes: int = 1024
    # The HTTP door: the OpenAI-compatible API and /metrics, /healthz, /readyz (one server).
    http_host: str = "127.0.0.1"
    http_port: int = 0  # 0 = a free port (printed at start), -1 = off
    wyoming_port: int = -1  # the Wyoming door (Home Assistant; its usual port is 10300); -1 = off
    # TLS for the WebSocket, HTTP and Wyoming listeners (PEM; both or neither)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # API keys (`katydid keys add`): empty = open to anyone who can reach the ports
    api_keys_file: str = ""
    # The Wyoming protocol has no authentication: the networks allowed to use that door
    wyoming_allow: str = "127.0.0.0/8,::1/128"
    ready_max_eta_s: float = 300.0  # /readyz fails while the queue ETA is longer
    # Chunker
    # Live audio: a pause of chunk_pause_s (WebRTC VAD and energy) ends an utterance of at
    # least chunk_min_s at once, so its final follows the speaker's pause.
    chunk_min_s: float = 1.0
    chunk_pause_s: float = 0.5
    # ... and once an utterance has run chunk_live_soft_s, a pause of chunk_soft_pause_s ends it
    # (fluent read speech pauses under 0.5 s between sentences: 21-28 s utterances, each a
    # full-window decode, with partials of it too); 0 = off.
    chunk_live_soft_s: float = 10.0
    chunk_soft_pause_s: float = 0.2
    # Files longer than chunk_max_s (shorter ones are one job) are cut in the longest pause
    # between file_chunk_min_s and file_chunk_max_s: chunks that fit the engine's clip-sized
    # windows (a 30 s window's encoder costs ~28 ms per second of window, a clip-sized one
    # 16-20) and fan out over the workers. On the shared mixes (617 s, tiny.en, AMD EPYC),
    # local path: 5..9.5 s 3.59% WER at 0.035 CPU s per audio s; 5..11.5 s 3.46% at 0.037;
    # 20..30 s 3.52% at 0.054; 3..7 s 4.31% at 0.041 (more runs, less context).
    file_chunk_min_s: float = 5.0
    file_chunk_max_s: float = 9.5
    chunk_max_s: float = 30.0
    chunk_silence_s: float = 0.3  # files: the shortest pause a chunk is cut in
    bulk_min_audio_s: float = 60.0  # files at least this long go to the bulk lane
    # A worker takes every Nth job from bulk when it has any, however busy interactive is
    # (0 = strict priority, which let 3 live clients starve uploads for minutes)
    bulk_every: int = 4
    # NATS / JetStream
    nats_url: str = ""  # empty: `katydid serve` embeds a nats-server
    nats_port: int = 0  # embedded server; 0 = a free port
    nats_monitor_port: int = 0
    # Credentials (any one way; none: an open server). `katydid serve` makes its own.
    nats_user: str = ""
    nats_password: str = field(default="", repr=False)
    nats_creds_file: str = ""  # a .creds file (JWT + nkey seed)
    nats_nkey_seed_file: str = ""  # an nkey seed file (user nkey authentication)
    nats_tls_ca_file: str = ""  # trust this CA for tls:// NATS URLs (else the system's)
    nats_connect_timeout_s: float = 10.0
    # A job NATS does not take (a stream electing a leader, a reconnect) is retried this long
    # before its session is told 'overloaded'
    publish_retry_s: float = 15.0
    nats_request_timeout_s: float = 5.0
    stream_max_bytes: int = 1024 * 1024 * 1024
    stream_max_msgs: int = 100_000
    stream_max_msg_bytes: int = 2 * 1024 * 1024
    stream_duplicate_window_s: float = 120.0
    stream_replicas: int = 1
    consumer_ack_wait_s: float = 30.0
    consumer_max_deliver: int = 4
    consumer_max_ack_pending: int = 1000
    job_deadline_s: float = 3600.0  # a job not started by then is answered 'expired'
    # A native session whose client (or gateway) went away waits this long to be resumed: its
    # record and its results are kept as long (then its jobs left are orphans, never decoded)
    resume_window_s: float = 120.0
    # A resumed session's first partial goes to the priority lane, ahead of every queued job
    # (the client's first sign its session is back, not a turn behind a backlog): at most this
    # many of a gateway's at once per model; past it one waits like any partial; 0 = none ahead
    resume_first_partials: int = 32
    # ...and a session's at most once in this long, however often its client reconnects
    resume_first_partial_every_s: float = 10.0
    results_max_bytes: int = 256 * 1024 * 1024  # the results stream's bound (oldest go first)
    # Sessions resumed at once, all gateways together: each reads its results through a
    # consumer of the results stream, and this is the stream's consumer limit (nats-server
    # 2.15 sets 1,000 where a stream sets none). Past it a resume is told `overloaded` with a
    # retry-after, its session kept.
    results_max_consumers: int = 10_000
    # The session records' bucket's bound (a record is ~0.5 KB: ~100,000 sessions)
    sessions_max_bytes: int = 64 * 1024 * 1024
    # A gateway says it is alive this often (katydid.gateways.<id>); workers set aside the jobs
    # of sessions whose gateway was not heard for 3 of these (it died: they may be resumed)
    gateway_heartbeat_s: float = 1.0
    # Bytes of jobs a worker sets aside while their sessions wait for their clients (detached),
    # decoding other sessions' jobs first; past it (or with nothing else to do) it decodes them
    worker_set_aside_bytes: int = 64 * 1024 * 1024
    # Workers
    workers: int = 0  # 0 = one per core
    # `katydid serve`'s workers per model, "MODEL=N,MODEL=N"; empty: `workers` x `model`
    worker_models: str = ""
    worker_heartbeat_s: float = 2.0
    worker_restart_max_backoff_s: float = 30.0
    # Added to a worker's CPU niceness at start: on a shared host inference yields to the
    # gateway, which must accept and answer thousands of clients while the workers are busy.
    worker_nice: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.worker_nice <= 19:
            raise ConfigError("worker_nice must be between 0 and 19")
        if self.engine_threads < 1:
            raise ConfigError("engine_threads must be >= 1")
        if self.results_max_consumers < 1:
            raise ConfigError("results_max_consumers must be >= 1")
        if self.beam_size < 0:
            raise ConfigError("beam_size must be >= 0 (0 = greedy)")
        if self.max_audio_s <= 0 or self.max_file_bytes <= 0:
            raise ConfigError("max_audio_s and max_file_bytes must be positive")
        if self.upload_min_bytes_per_s <= 0 or self.upload_rate_grace_s < 0:
            raise ConfigError(
                "upload_min_bytes_per_s must be positive and upload_rate_grace_s at least 0"
            )
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("log_format must be auto, json or console")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")
        if not 0 < self.chunk_min_s <= self.chunk_max_s <= 30.0:
            raise ConfigError("need 0 < chunk_min_s <= chunk_max_s <= 30")
        if not 0 < self.file_chunk_min_s <= self.file_chunk_max_s <= self.chunk_max_s:
            raise ConfigError("need 0 < file_chunk_min_s <= file_chunk_max_s <= chunk_max_s")
        if not 0.03 <= self.chunk_pause_s < self.chunk_max_s:
            raise ConfigError("chunk_pause_s must be at least 0.03 (one frame) and < chunk_max_s")
        if self.chunk_live_soft_s and not (
            self.chunk_min_s <= self.chunk_live_soft_s <= self.chunk_max_s
        ):
            raise ConfigError("chunk_live_soft_s must be 0 (off) or chunk_min_s..chunk_max_s")
        if not 0.03 <= self.chunk_soft_pause_s <= self.chunk_pause_s:
            raise ConfigError("chunk_soft_pause_s must be at least 0.03 and <= chunk_pause_s")
        for name in (
            "upload_memory_bytes",
            "upload_memory_total_bytes",
            "publish_window_bytes",
            "max_prompt_bytes",
            "max_frame_bytes",
            "max_jobs_in_flight",
            "stream_max_bytes",
            "stream_max_msgs",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        self.worker_plan()  # raises on a malformed worker_models
        self.wyoming_networks()  # raises on a malformed wyoming_allow
        if not 0 <= self.malloc_mmap_threshold_bytes <= 32 * 1024 * 1024:
            raise ConfigError("malloc_mmap_threshold_bytes must be 0 (glibc's own) to 32 MiB")
        if self.queued_interval_s < 0:
            raise ConfigError("queued_interval_s must be >= 0 (0 = every change)")
        if self.malloc_trim_interval_s < 0:
            raise ConfigError("malloc_trim_interval_s must be >= 0 (0 = never)")
        if self.resume_first_partial_every_s < 0:
            raise ConfigError("resume_first_partial_every_s must be >= 0")
        if self.resume_first_partials < 0:
            raise ConfigError("resume_first_partials must be >= 0 (0 = none ahead of the queue)")
        if self.bulk_every < 0:
            raise ConfigError("bulk_every must be >= 0 (0 = interactive strictly first)")
        # A port out of range would be taken modulo 65536 by the socket layer, without a word.
        for name, low in (
            ("port", 0),
            ("http_port", -1),
            ("wyoming_port", -1),
            ("nats_port", 0),
            ("nats_monitor_port", 0),
        ):
            if not low <= getattr(self, name) <= 65535:
                off = " (-1 = off)" if low < 0 else ""
                raise ConfigError(f"{name} must be {low}..65535{off} (0 = a free port)")
        if self.workers < 0:
            raise ConfigError("workers must be >= 0 (0 = one per core)")
        if self.default_max_wait_s < 0:
            raise ConfigError("default_max_wait_s must be >= 0")
        if self.stream_max_msg_bytes < 1_000_000:
            raise ConfigError("stream_max_msg_bytes must hold a 30 s chunk (>= 1000000)")

    def wyoming_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """``wyoming_allow`` as networks ("127.0.0.0/8,::1/128"; "0.0.0.0/0,::/0" is anyone)."""
        try:
            return [
                ipaddress.ip_network(item.strip(), strict=False)
                for item in self.wyoming_allow.split(",")
                if item.strip()
            ]
        except ValueError as exc:
            raise ConfigError(f"wyoming_allow: {exc}") from None

    def worker_plan(self, cores: int = 1) -> list[tuple[str, int]]:
        """``[(model, processes)]`` for ``katydid serve``: ``worker_models``, or ``workers``
        (0: ``cores``) of ``model``.

        Raises:
            ConfigError: ``worker_models`` is not ``MODEL=N,...`` with N >= 1.
        """
        if not self.worker_models.strip():
            return [(self.model, self.workers or cores)]
        plan: dict[str, int] = {}
        for item in self.worker_models.split(","):
            name, sep, count = item.strip().partition("=")
            if not sep or not name.strip() or not count.strip().isdigit() or int(count) < 1:
                raise ConfigError(
                    f"worker_models item {item.strip()!r} is not MODEL=N (N >= 1), e.g."
                    " tiny.en-q8_0=2,base=1"
                )
            plan[name.strip()] = plan.get(name.strip(), 0) + int(count)
        return list(plan.items())

    @classmethod
    def load(
        cls,
        path: Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Config:
        """Build the configuration from a TOML file, the environment and overrides.

        Args:
            path: TOML file; defaults to ``$KATYDID_CONFIG`` if set.
            environ: environment to read (default ``os.environ``).
            overrides: values that win over everything (e.g. command-line flags); ``None``
                values are ignored.

        Raises:
            ConfigError: an unknown key or a value of the wrong type.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = path or (
            Path(env[f"{ENV_PREFIX}CONFIG"]) if env.get(f"{ENV_PREFIX}CONFIG") else None
        )
        if path is not None:
            try:
                values.update(tomllib.loads(path.read_text(encoding="utf-8")))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for old, new in _RENAMED.items():  # still read under their old names
            if old in values:
                values.setdefault(new, values.pop(old))
            raw_old = env.get(ENV_PREFIX + old.upper())
            if raw_old is not None and env.get(ENV_PREFIX + new.upper()) is None:
                values[new] = raw_old
        for name in fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        unknown = set(values) - set(fields)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**{k: _coerce(k, fields[k].type, v) for k, v in values.items()})


# Settings renamed since: the old name still works, in a file and in the environment.
_RENAMED = {"metrics_host": "http_host", "metrics_port": "http_port"}


def _coerce(name: str, type_name: Any, value: Any) -> Any:
    # Field types are strings under `from __future__ import annotations`.
    kind = str(type_name)
    try:
        if kind == "Path":
            return Path(value).expanduser()
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config {name}: {value!r} is not a valid {kind}") from exc
    raise ConfigError(f"config {name}: unsupported type {kind}")  # pragma: no cover
