"""What a session tells its adapter to do (``Output``), and what jobs need from the gateway
(``JobStamp``). Frozen values, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from katydid.errors import ErrorCode
from katydid.gateway.events import ServerEvent
from katydid.gateway.options import StartOptions
from katydid.messages import Job, JobOptions, ResultError

# --- outputs: what the adapter must do ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send this event to the client (through its one writer, in this order)."""

    event: ServerEvent


@dataclass(frozen=True, slots=True)
class Admit:
    """Decide the session's model and whether it may wait (``admitted`` or ``fail`` answers)."""

    options: StartOptions


@dataclass(frozen=True, slots=True)
class Publish:
    """Queue this job (PCM s16le 16 kHz mono body) on ``model``'s ``lane``; answer with
    ``published`` (or ``publish_failed``)."""

    job: Job
    pcm: bytes
    model: str
    lane: str


@dataclass(frozen=True, slots=True)
class Decode:
    """Decode this upload (rewound) block by block, off the event loop: ``decoding(duration)``,
    then ``decoded(block)`` for each, then ``decoded_end()``. The adapter closes it."""

    upload: IO[bytes]


@dataclass(frozen=True, slots=True)
class CancelJobs:
    """The session ended with these jobs (stream sequences) unanswered: delete them from the
    queue and tell workers to abort the session's running ones."""

    session_id: str
    stream_seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Close:
    """End the connection with this close code; the session is over (``outcome`` for logs)."""

    code: int
    reason: str
    outcome: str


@dataclass(frozen=True, slots=True)
class Remember:
    """What the session's record in NATS holds changed (a resumable session): write it, in
    the background (``state``: attached, or detached when its client went away)."""

    state: str = "attached"


@dataclass(frozen=True, slots=True)
class Forget:
    """The session ended for good: its record goes (its jobs left are then orphans)."""

    session_id: str


@dataclass(frozen=True, slots=True)
class Reattach:
    """A client asks to resume a session: check its token, read the session's record, take it
    over (``resumed`` or ``fail`` answers)."""

    session_id: str
    token: str
    after_seq: int
    api_key: str | None = None


Output = Send | Admit | Publish | Decode | CancelJobs | Close | Remember | Forget | Reattach


@dataclass(frozen=True, slots=True)
class JobStamp:
    """What a job needs from its gateway: the subject results come back on, the gateway's proof
    for a job id, and the wall clock (deadlines travel as Unix time)."""

    reply_subject: str
    token: Callable[[str], str]
    unix_now: Callable[[], float]

    def job(
        self,
        session_id: str,
        opts: StartOptions,
        job_id: str,
        seq: int,
        offset_ms: int,
        deadline_s: float,
        kind: str,
    ) -> Job:
        """A job of a session: its options (words only for finals), the reply subject and
        token, a deadline ``deadline_s`` from now."""
        return Job(
            job_id=job_id,
            session_id=session_id,
            seq=seq,
            offset_ms=offset_ms,
            # Per session: a gateway that resumes it reads its results from the results stream
            reply_subject=f"{self.reply_subject}.{session_id}",
            deadline_unix_ms=int((self.unix_now() + deadline_s) * 1000),
            options=JobOptions(
                language=opts.language,
                word_timestamps=opts.word_timestamps and kind == "final",
                prompt=opts.prompt,
                task=opts.task,
                kind=kind,
            ),
            token=self.token(job_id),
        )


def error_code(raw: str) -> ErrorCode:
    """A worker's error code as a client code (``expired``/``cancelled`` are timeouts)."""
    if raw in (ResultError.EXPIRED, ResultError.CANCELLED, ResultError.ORPHANED):
        return ErrorCode.TIMEOUT
    try:
        return ErrorCode(raw)
    except ValueError:
        return ErrorCode.INTERNAL
