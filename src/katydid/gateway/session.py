"""One client session, sans-IO (h11-style): typed inputs in, typed outputs out.

The doors feed a ``Session`` what happened — a typed client input (``inputs.py``: each door
parses its own wire), audio bytes, a decoded block of an upload, a job's result, the clock,
the queue's state — and carry out
what it returns: ``Send`` an event, ``Publish`` a job, ``Decode`` an upload, ``CancelJobs``,
``Close``. It owns option validation, chunking, job building, the in-flight bookkeeping, in-order
delivery and completion; it imports neither trio nor nats, and time is an input (``now``), so its
whole life is unit-tested without sockets or sleeps.

Rule 1: finals leave in chunk order (``ledger.py`` keeps the jobs in flight and the order).
Rule 2: every bound ends the session with a coded ``ErrorEvent`` and a ``Close``; nothing is
dropped silently. An input never raises: a ``ProtocolError`` becomes those outputs.
Rule 3: a session that ends with jobs unanswered says which (``CancelJobs``), however it ends.

Phases and the inputs each allows (any other input there is ``bad_message``; in CLOSED every
input is ignored; ``fail``, ``client_gone`` and ``shutdown`` close it from any phase):

    phase        allowed inputs                                    next phase
    AWAIT_START  receive(Start)                                    ADMITTING
    ADMITTING    admitted (the gateway chose the model)            STREAMING
    STREAMING    receive_bytes (PCM or file bytes), receive_file,  STREAMING
                 results, ticks, queue news
                 receive(Stop)                                     STOPPED
    STOPPED      decoding/decoded/decoded_end (a file), results,   STOPPED, or CLOSED once
                 ticks, queue news, published/publish_failed       every chunk is answered
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from katydid.audio import SAMPLE_RATE
from katydid.chunker import Chunk
from katydid.errors import ErrorCode, ProtocolError
from katydid.gateway.events import ErrorEvent, Final, Ready
from katydid.gateway.inputs import ClientInput, Resume, Start, Stop
from katydid.gateway.intake import AudioIntake
from katydid.gateway.ledger import JobLedger
from katydid.gateway.options import Limits, StartOptions
from katydid.gateway.outputs import (
    Admit,
    CancelJobs,
    Close,
    Decode,
    Forget,
    JobStamp,
    Output,
    Publish,
    Reattach,
    Remember,
    Send,
    error_code,
)
from katydid.gateway.session_clock import SessionClock
from katydid.gateway.session_losses import SessionLosses
from katydid.gateway.session_queries import Phase
from katydid.gateway.session_resume import DETACHED_OUTCOME, SessionResume
from katydid.messages import Job, JobResult
from katydid.session_record import ATTACHED, DETACHED


@dataclass(slots=True)
class Session(SessionClock, SessionResume, SessionLosses):
    """The state of one client session; ``now`` is any monotonic clock, in seconds."""

    session_id: str
    limits: Limits
    stamp: JobStamp
    now: float  # when the connection was accepted
    phase: Phase = Phase.AWAIT_START
    options: StartOptions | None = None
    model: str = ""  # set at admission: the model its jobs go to
    outcome: str = ""  # set when CLOSED: ok, a client error code, client_gone, shutdown
    last_queued: tuple[int, int, float] | None = None  # position, whole-second ETA, when
    cancelled_jobs: int = 0  # jobs it ended without, cancelled
    intake: AudioIntake | None = None  # from start until the audio is over
    # What is kept of the intake once the audio is over (a session waiting in the queue for
    # its results holds no chunker, VAD or upload: ~1.5 KB each, x 10,000)
    _lane: str = "interactive"
    _chunks: int = 0
    _audio_s: float = 0.0
    _last_input: float = 0.0
    _stopped_at: float = 0.0
    _flushed: bool = False
    _jobs_out: JobLedger = field(default_factory=JobLedger)
    _partials: int = 0
    _partial_in_flight: bool = False
    # Resumption (session_resume.py): whether its client may resume it (native door), the token
    # that proves it, and the samples its final jobs hold (where a resumed client resends from)
    resumable: bool = False
    kept: bool = False  # it has a record in NATS (every session, with resumption on)
    resume_token: str = ""
    _partial_tag: str = ""  # set by a resume: this connection's partial job ids are its own
    _ahead: bool = False  # resumed, and its first partial may go ahead of the queue
    _ahead_after_unix: float = 0.0  # SessionRecord.ahead_after_unix
    # Resumed: the audio its earlier connection had sent (the record's), which the client
    # resends at once; no partial before the resent audio is in (it would read backwards)
    _catch_up_s: float = 0.0
    _in_jobs: int = 0

    def __post_init__(self) -> None:
        self._last_input = self.now

    # --- client input ---

    def receive(self, event: ClientInput, now: float) -> list[Output]:
        """The client's ``Start`` or ``Stop`` (typed: each door parses its own wire)."""
        self._last_input = now
        if self.phase is Phase.CLOSED:
            return []
        try:
            if isinstance(event, Start):
                return self._start(event.options)
            if isinstance(event, Resume):
                return self._resume(event)
            return self._stop(now)
        except ProtocolError as exc:
            return self.fail(exc)

    def start_with(self, fields: dict[str, Any], now: float) -> list[Output]:
        """``Start`` from a door's own fields (the HTTP form, Wyoming's ``transcribe``, vosk's
        config), validated as a native ``start`` is: a bad one ends the session, coded."""
        try:
            options = StartOptions.from_message(fields, self.limits)
        except ProtocolError as exc:
            return self.refuse(exc, now)
        return self.receive(Start(options), now)

    def refuse(self, exc: ProtocolError, now: float) -> list[Output]:
        """The client sent what its door could not parse: the session ends, coded."""
        self._last_input = now
        return self.fail(exc)

    def _start(self, options: StartOptions) -> list[Output]:
        if self.phase is not Phase.AWAIT_START:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "start sent twice")
        self.options = options
        self.intake = AudioIntake(self.limits, options)
        self.phase = Phase.ADMITTING
        return [Admit(options)]

    def _resume(self, event: Resume) -> list[Output]:
        if self.phase is not Phase.AWAIT_START:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "start sent twice")
        if not self.resumable:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "this door does not resume sessions")
        self.phase = Phase.ADMITTING
        return [Reattach(event.session_id, event.token, event.after_seq, event.api_key)]

    def _stop(self, now: float) -> list[Output]:
        if self.phase is not Phase.STREAMING:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"stop not allowed in state {self.phase.value}"
            )
        self.phase = Phase.STOPPED
        self._stopped_at = now
        assert self.options is not None
        assert self.intake is not None
        if self.options.is_file:
            return [Decode(self.intake.stored_upload())]
        return self._finish()

    def admitted(
        self, model: str, offers: tuple[dict[str, Any], ...], upload: IO[bytes] | None = None
    ) -> list[Output]:
        """Admission chose ``model``; the client hears ``ready`` and may send audio. ``upload``:
        where a file's bytes wait until stop (default: memory)."""
        if self.phase is not Phase.ADMITTING or self.intake is None:
            return []
        if upload is not None:
            self.intake.upload = upload
        self.model = model
        self.phase = Phase.STREAMING
        ready = Send(Ready(self.session_id, model, offers, self.resume_token))
        return [ready, Remember(ATTACHED)] if self.kept else [ready]

    @property
    def uploading(self) -> bool:
        """A file's bytes are coming: a door may hand them on a piece of a message at a time."""
        return self.phase is Phase.STREAMING and self.options is not None and self.options.is_file

    def receive_bytes(
        self,
        data: bytes,
        now: float,
        *,
        partials_allowed: bool = False,
        message_bytes: int | None = None,
    ) -> list[Output]:
        """A binary audio frame: live PCM is cut into chunks (published at once), a file's bytes
        are kept until ``stop``. ``partials_allowed``: the queue has room for a partial now.
        ``message_bytes``: ``data`` is a piece of a message this long so far (the frame bound
        is the message's)."""
        self._last_input = now
        try:
            return self._bytes(data, partials_allowed, message_bytes)
        except ProtocolError as exc:
            return self.fail(exc)

    def _bytes(
        self, data: bytes, partials_allowed: bool, message_bytes: int | None
    ) -> list[Output]:
        if self.phase is Phase.CLOSED:
            return []
        if self.phase is not Phase.STREAMING:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, "audio is only allowed between start and stop"
            )
        assert self.intake is not None
        out = self._jobs(self.intake.frame(data, message_bytes))
        if partials_allowed:
            out += self._partial()
        return out

    def receive_file(self, upload: IO[bytes], size: int, now: float) -> list[Output]:
        """A whole file at once (a door that received it in one request): as its frames and
        ``stop`` would be."""
        self._last_input = now
        try:
            if self.phase is not Phase.STREAMING or self.options is None or self.intake is None:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "a file is only allowed after start")
            if not self.options.is_file:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "a file needs a container format")
            self.intake.adopt(upload, size)
        except ProtocolError as exc:
            return self.fail(exc)
        return self.receive(Stop(), now)

    # --- an upload, decoded by the adapter after stop ---

    def decoding(self, duration_s: float) -> None:
        """The file's length from its header (0 if unknown)."""
        assert self.intake is not None
        self.intake.file_length(duration_s)

    def decoded(self, audio: np.ndarray) -> list[Output]:
        """A block of the decoded file (16 kHz mono int16): the chunks it completes."""
        if self.phase is not Phase.STOPPED or self.intake is None:
            return []
        try:
            return self._jobs(self.intake.block(audio))
        except ProtocolError as exc:
            return self.fail(exc)

    @property
    def buffered_audio_bytes(self) -> int:
        """Audio held for the chunk being cut (int16 bytes): what its job's body will hold."""
        return 0 if self.intake is None else 2 * self.intake.chunker.buffered_samples

    def decoded_end(self) -> list[Output]:
        """The whole file is decoded: the last chunks."""
        try:
            return self._finish() if self.phase is Phase.STOPPED else []
        except ProtocolError as exc:
            return self.fail(exc)

    def _finish(self) -> list[Output]:
        assert self.intake is not None
        self._flushed = True
        out = self._jobs(self.intake.end())
        self._retire_intake()
        if self.kept:
            out.append(Remember(ATTACHED))  # stopped: a resumed client sends no more audio
        return out + self._completion()

    def _retire_intake(self) -> None:
        """The audio is over: keep what the session still reports, let the rest go."""
        intake = self.intake
        assert intake is not None
        self._lane, self._chunks, self._audio_s = (
            intake.lane,
            intake.chunker.chunks_emitted,
            intake.audio_s,
        )
        intake.upload.close()
        self.intake = None

    def _jobs(self, chunks: list[Chunk]) -> list[Output]:
        out: list[Output] = []
        for chunk in chunks:
            self._jobs_out.sent(chunk.seq)
            self._in_jobs = round(chunk.offset_s * SAMPLE_RATE) + chunk.audio.size
            job = self._job(
                f"{self.session_id}-{chunk.seq}",
                chunk.seq,
                round(chunk.offset_s * 1000),
                self.limits.job_deadline_s,
                "final",
            )
            out.append(Publish(job, _body(chunk.audio), self.model, self.lane))
        return out

    def _job(self, job_id: str, seq: int, offset_ms: int, deadline_s: float, kind: str) -> Job:
        assert self.options is not None
        return self.stamp.job(
            self.session_id, self.options, job_id, seq, offset_ms, deadline_s, kind
        )

    # --- partial results ---

    def _partial(self) -> list[Output]:
        """A partial job for the utterance in progress, if one is due: at most one in flight per
        session (and none unless the client asked)."""
        opts = self.options
        if self._partial_in_flight or opts is None or not opts.partials or self.intake is None:
            return []
        if self.intake.audio_s < self._catch_up_s:
            return []  # the resent audio is still coming in
        due = self.intake.partial_audio()
        if due is None:
            return []
        seq, samples = due
        # A resumed session's first partial goes ahead of the queue (Seating.partials_allowed).
        ahead = self.awaits_first_partial and self.limits.resume_first_partials > 0
        self._partial_in_flight = True
        self._partials += 1
        # A resumed session's partials count from 1 again: the tag keeps their ids (and so
        # their Nats-Msg-Id) apart from every earlier connection's (session_resume.py).
        job_id = f"{self.session_id}-{seq}-p{self._partials}{self._partial_tag}"
        job = self._job(job_id, seq, 0, self.limits.partial_deadline_s, "partial")
        return [Publish(job, _body(samples), self.model, "priority" if ahead else "interactive")]

    # --- what became of a publish ---

    def published(self, seq: int, stream_seq: int) -> list[Output]:
        """A final's job is in the stream at ``stream_seq``. If the session ended meanwhile, the
        job is cancelled at once."""
        if not self._jobs_out.stored(seq, stream_seq):
            return []  # answered before its publish was acknowledged
        if self.resumable and self.outcome in (DETACHED_OUTCOME, "shutdown"):  # it may come back
            return [Remember(DETACHED)]
        if self.phase is Phase.CLOSED:
            self._jobs_out.abandon()
            self.cancelled_jobs += 1
            return [CancelJobs(self.session_id, (stream_seq,))]
        return []  # (its record was written before it was published: resumption.py Rule 4)

    def publish_failed(self, job: Job, exc: ProtocolError) -> list[Output]:
        """A job could not be queued: a partial is skipped (its final will come anyway), a
        final ends the session with ``exc``."""
        if job.options.kind == "partial":
            self._partial_in_flight = False
            return []
        self._jobs_out.not_sent(job.seq)
        return self.fail(exc)

    # --- worker results ---

    def receive_result(self, result: JobResult) -> list[Output]:
        """A worker's result: the finals (and chunk errors) now deliverable, in order; ``done``
        and the close once every chunk is answered."""
        if self.phase is Phase.CLOSED:
            return []
        if result.kind == "partial":
            self._partial_in_flight = False
            if result.error or not result.text or result.seq < self._jobs_out.next_seq:
                return []
            return [Send(Final(result.seq, 0.0, 0.0, result.text, (), kind="partial"))]
        out: list[Output] = []
        for r in self._jobs_out.answered(result):
            if r.error:
                code = error_code(r.error.get("code", ""))
                message = r.error.get("message", "chunk failed")
                out.append(Send(ErrorEvent(code, message, seq=r.seq)))
            elif r.text:
                segs = tuple(s.to_dict() for s in r.segments)
                start = r.segments[0].start_s if r.segments else 0.0
                end = r.segments[-1].end_s if r.segments else 0.0
                final = Final(
                    r.seq, start, end, r.text, segs, worker=r.worker, queue_s=r.queue_s,
                    language=r.language,
                )  # fmt: skip
                out.append(Send(final))
        return out + self._completion()

    def _completion(self) -> list[Output]:
        if not (self.phase is Phase.STOPPED and self._flushed and not self._jobs_out.in_flight):
            return []
        if self._jobs_out.next_seq < self.chunks_total:
            return []
        self.phase = Phase.CLOSED
        self.outcome = "ok"
        forget: list[Output] = [Forget(self.session_id)] if self.kept else []
        return [Send(self.done_event()), *forget, Close(1000, "done", "ok")]

    # --- endings from outside ---

    def fail(self, exc: ProtocolError) -> list[Output]:
        """End the session with a coded error (sent, then the close code); its unanswered jobs
        are cancelled."""
        if self.phase is Phase.CLOSED:
            return []
        out: list[Output] = [Send(ErrorEvent(exc.code, exc.message, exc.retry_after_s))]
        return out + self._close(exc.close_code, exc.code.value, str(exc.code))

    def client_gone(self, *, too_large: bool = False, said_goodbye: bool = False) -> list[Output]:
        """The connection is gone (closed, reset, or over the transport's frame limit). A
        resumable session is kept for its client to resume, unless it closed normally (1000)."""
        if self.phase is Phase.CLOSED:
            return []
        if not (too_large or said_goodbye) and (detached := self.detach()) is not None:
            return detached
        outcome = "too_large" if too_large else "client_gone"
        return [o for o in self._close(1000, outcome, outcome) if not isinstance(o, Close)]

    def shutdown(self) -> list[Output]:
        """The server stops before the session finished: the client is told to come back (a
        resumable session is detached: its client resumes it on another gateway)."""
        stopping = ProtocolError(
            ErrorCode.OVERLOADED, "the server is shutting down", retry_after_s=1.0
        )
        if (stepped := self.step_aside(stopping, "shutdown")) is not None:
            return stepped  # its client resumes it at once, on another gateway
        out = self.fail(
            ProtocolError(ErrorCode.OVERLOADED, "the server is shutting down", retry_after_s=5.0)
        )
        self.outcome = "shutdown"
        return out

    def _close(self, code: int, reason: str, outcome: str) -> list[Output]:
        self.phase = Phase.CLOSED
        self.outcome = outcome
        out: list[Output] = []
        abandoned = self._jobs_out.abandon()
        if abandoned:
            self.cancelled_jobs += len(abandoned)
            out.append(CancelJobs(self.session_id, abandoned))
        if self.kept:
            out.append(Forget(self.session_id))
        return [*out, Close(code, reason, outcome)]


def _body(samples: np.ndarray) -> bytes:
    """A job's body: the int16 samples as s16le."""
    return samples.astype("<i2", copy=False).tobytes()
