"""The gateway↔worker envelope (ARCHITECTURE.md §3): jobs as NATS headers + PCM, results as JSON.

Pure value types, validated at construction and built from the wire by named constructors
(``Job.from_headers``, ``JobResult.from_json``); nothing here imports nats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from katydid import wire_json
from katydid.errors import MessageError

SUBJECT_PREFIX = "katydid.jobs"
# priority: ahead of every other job, for the few that say a session is back (a resumed
# session's first partial); interactive: live utterances and short files; bulk: long uploads.
LANES = ("interactive", "bulk", "priority")
STREAM = "KATYDID_JOBS"
CANCEL_SUBJECT = "katydid.cancel"
WORKERS_SUBJECT = "katydid.workers"
RESULTS_PREFIX = "katydid.results"

STREAM_SUBJECTS = f"{SUBJECT_PREFIX}.>"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_model_name(name: str) -> bool:
    """A name jobs can be routed by: letters, digits, ``.``, ``_``, ``-``; at most 64."""
    return _MODEL_NAME.fullmatch(name) is not None


def sender_token(user: str | None) -> str:
    """The last token of the subject a worker answers on (``<reply subject>.<token>``): its NATS
    user, which the worker role may publish results under and no other (``accounts.py``), so
    the gateway knows which identity answered each job."""
    token = re.sub(r"[^A-Za-z0-9_-]", "_", user or "")[:64]
    return token or "anonymous"


def model_token(model: str) -> str:
    """A model name as one NATS subject token and consumer-name part: ``.`` separates tokens
    there and may not appear in a consumer name, so ``tiny.en-q8_0`` -> ``tiny_en-q8_0``."""
    if not is_model_name(model):
        raise MessageError(f"model name {model!r} is not a plain name")
    return model.replace(".", "_")


def lane_subject(model: str, lane: str) -> str:
    """Jobs for ``model`` in ``lane``: ``katydid.jobs.<model>.<lane>``. Each model has its own
    subjects and consumers, so a job never reaches a worker of another model."""
    if lane not in LANES:
        raise MessageError(f"unknown lane {lane!r}")
    return f"{SUBJECT_PREFIX}.{model_token(model)}.{lane}"


def consumer_name(model: str, lane: str) -> str:
    """The durable pull consumer the workers of ``model`` share for ``lane``."""
    if lane not in LANES:
        raise MessageError(f"unknown lane {lane!r}")
    return f"workers-{model_token(model)}-{lane}"


TASKS = ("transcribe", "translate")


class ResultError(StrEnum):
    """The error codes a worker puts in a result (``JobResult.error["code"]``)."""

    CANCELLED = "cancelled"  # the session's client left (``katydid.cancel``)
    EXPIRED = "expired"  # the job waited past its deadline
    BAD_JOB = "bad_job"  # the body is not PCM
    INTERNAL = "internal"  # the engine failed on it
    # The session has no record in KATYDID_SESSIONS (it ended, or was not resumed in time):
    # nobody will ever read the result (session_record.py).
    ORPHANED = "orphaned"

    @property
    def skipped(self) -> bool:
        """Not transcribed on purpose (nobody wants it), not a failure."""
        return self in (ResultError.CANCELLED, ResultError.EXPIRED, ResultError.ORPHANED)


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What the worker's engine applies to this job alone (the gateway validated them at start
    against the model's abilities)."""

    language: str = "en"  # a Whisper language code, or "auto" (detect)
    word_timestamps: bool = False
    prompt: str | None = None  # whisper's initial prompt; bounded in bytes at start
    kind: str = "final"  # final | partial
    task: str = "transcribe"  # transcribe | translate (into English)

    def to_json(self) -> str:
        # ASCII on purpose: a NATS header is not the place for raw UTF-8. The prompt's bound is
        # in bytes, so even escaped (up to 6 bytes per character) the header stays small.
        return json.dumps(
            {
                "language": self.language,
                "word_timestamps": self.word_timestamps,
                "prompt": self.prompt,
                "kind": self.kind,
                "task": self.task,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str) -> JobOptions:
        try:
            d = wire_json.loads(raw) if raw else {}
            opts = cls(
                language=str(d.get("language") or "en"),
                word_timestamps=bool(d.get("word_timestamps", False)),
                prompt=d.get("prompt") if isinstance(d.get("prompt"), str) else None,
                kind=str(d.get("kind") or "final"),
                task=str(d.get("task") or "transcribe"),
            )
        except (ValueError, AttributeError) as exc:
            raise MessageError(f"bad Katydid-Options header: {exc}") from exc
        if opts.kind not in ("final", "partial"):
            raise MessageError(f"bad job kind {opts.kind!r}")
        if opts.task not in TASKS:
            raise MessageError(f"bad job task {opts.task!r}")
        return opts


@dataclass(frozen=True, slots=True)
class Job:
    """One utterance chunk to transcribe; the PCM travels as the message body."""

    job_id: str
    session_id: str
    seq: int
    offset_ms: int
    reply_subject: str
    deadline_unix_ms: int
    options: JobOptions = field(default_factory=JobOptions)
    # The publishing gateway's proof for this job, echoed in its result: a result without the
    # right token did not come from a worker that took this job (a forged transcript).
    token: str = ""

    def __post_init__(self) -> None:
        if self.seq < 0 or self.offset_ms < 0:
            raise MessageError("seq and offset_ms must be >= 0")
        if not self.job_id or not self.session_id or not self.reply_subject:
            raise MessageError("job_id, session_id and reply_subject are required")

    def headers(self) -> dict[str, str]:
        return {
            "Nats-Msg-Id": self.job_id,
            "Katydid-Job": self.job_id,
            "Katydid-Session": self.session_id,
            "Katydid-Seq": str(self.seq),
            "Katydid-Offset-Ms": str(self.offset_ms),
            "Katydid-Reply": self.reply_subject,
            "Katydid-Deadline": str(self.deadline_unix_ms),
            "Katydid-Options": self.options.to_json(),
            "Katydid-Token": self.token,
        }

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None) -> Job:
        """Build a Job from NATS message headers.

        Raises:
            MessageError: a header is missing or malformed.
        """
        h = headers or {}
        try:
            return cls(
                job_id=h["Katydid-Job"],
                session_id=h["Katydid-Session"],
                seq=int(h["Katydid-Seq"]),
                offset_ms=int(h["Katydid-Offset-Ms"]),
                reply_subject=h["Katydid-Reply"],
                deadline_unix_ms=int(h["Katydid-Deadline"]),
                options=JobOptions.from_json(h.get("Katydid-Options", "")),
                token=h.get("Katydid-Token", ""),
            )
        except KeyError as exc:
            raise MessageError(f"job lacks header {exc.args[0]}") from None
        except ValueError as exc:
            raise MessageError(f"job has a malformed header: {exc}") from None


@dataclass(frozen=True, slots=True)
class ResultWord:
    word: str
    start_s: float  # session-relative, like its segment's times
    end_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"word": self.word, "start_s": self.start_s, "end_s": self.end_s}


@dataclass(frozen=True, slots=True)
class ResultSegment:
    start_s: float
    end_s: float
    text: str
    words: tuple[ResultWord, ...] = ()  # only when the job asked for word timestamps

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"start_s": self.start_s, "end_s": self.end_s, "text": self.text}
        if self.words:
            d["words"] = [w.to_dict() for w in self.words]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResultSegment:
        return cls(
            float(d["start_s"]),
            float(d["end_s"]),
            str(d["text"]),
            tuple(
                ResultWord(str(w["word"]), float(w["start_s"]), float(w["end_s"]))
                for w in d.get("words", ())
            ),
        )


@dataclass(frozen=True, slots=True)
class JobResult:
    """A worker's answer to one job; ``error`` is None or ``{code, message}``."""

    job: str
    session: str
    seq: int
    kind: str
    text: str
    segments: tuple[ResultSegment, ...]
    language: str
    audio_s: float
    compute_s: float
    queue_s: float
    worker: str
    error: Mapping[str, str] | None = None
    token: str = ""  # the job's Katydid-Token, echoed
    # Stretches of speech (start_s, end_s, session time) the engine decoded twice and still
    # got no text for: said, so that a transcript with a gap is never taken for a whole one.
    uncovered: tuple[tuple[float, float], ...] = ()

    @property
    def uncovered_s(self) -> float:
        return sum(end - start for start, end in self.uncovered)

    def to_json(self) -> bytes:
        d: dict[str, Any] = {
            "job": self.job,
            "session": self.session,
            "seq": self.seq,
            "kind": self.kind,
            "text": self.text,
            "segments": [s.to_dict() for s in self.segments],
            "language": self.language,
            "audio_s": round(self.audio_s, 3),
            "compute_s": round(self.compute_s, 3),
            "queue_s": round(self.queue_s, 3),
            "worker": self.worker,
            "error": dict(self.error) if self.error else None,
            "token": self.token,
        }
        if self.uncovered:
            d["uncovered"] = [list(span) for span in self.uncovered]
        return json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> JobResult:
        """Parse a result message.

        Raises:
            MessageError: not JSON, or a field is missing or of the wrong type.
        """
        try:
            d = wire_json.loads(raw)
            err = d.get("error")
            return cls(
                job=str(d["job"]),
                session=str(d["session"]),
                seq=int(d["seq"]),
                kind=str(d.get("kind", "final")),
                text=str(d.get("text", "")),
                segments=tuple(ResultSegment.from_dict(s) for s in d.get("segments", [])),
                language=str(d.get("language", "")),
                audio_s=float(d.get("audio_s", 0.0)),
                compute_s=float(d.get("compute_s", 0.0)),
                queue_s=float(d.get("queue_s", 0.0)),
                worker=str(d.get("worker", "")),
                error={"code": str(err["code"]), "message": str(err.get("message", ""))}
                if err
                else None,
                token=str(d.get("token", "")),
                uncovered=tuple(
                    (float(start), float(end)) for start, end in d.get("uncovered", ())
                ),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MessageError(f"malformed result: {exc}") from exc
