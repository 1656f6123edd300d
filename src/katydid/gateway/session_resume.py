"""A session that outlives its connection (``SessionResume``, a part of ``Session``): what its
record in NATS holds, how a reconnected client takes it back, and how a session is given up
without being lost (detached: its jobs go on, their results wait in the results stream).

Every session has a record while it lives (``Session.kept``: a worker skips the jobs of a
session that has none), but only native-protocol sessions are resumable (``Session.resumable``);
the other doors' wires have no way to resume, and their sessions end with their connection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from katydid.audio import SAMPLE_RATE
from katydid.errors import ErrorCode, ProtocolError
from katydid.gateway.events import ErrorEvent, Resumed
from katydid.gateway.intake import AudioIntake
from katydid.gateway.ledger import JobLedger
from katydid.gateway.options import StartOptions
from katydid.gateway.outputs import Close, Output, Remember, Send
from katydid.gateway.session_queries import Phase, SessionQueries
from katydid.session_record import ATTACHED, DETACHED, QUEUED_KEPT, SessionRecord

DETACHED_OUTCOME = "detached"  # the client went away; the session waits for it to resume
TAKEN = "a newer connection resumed the session"  # what an older connection hears


class SessionResume(SessionQueries):
    """Resumption over the state ``Session`` holds (declared here, kept by ``Session``)."""

    if not TYPE_CHECKING:
        __slots__ = ()
    session_id: str
    options: StartOptions | None
    model: str
    outcome: str
    resumable: bool
    kept: bool
    resume_token: str
    _partial_tag: str
    _ahead: bool
    _ahead_after_unix: float
    _catch_up_s: float
    _partials: int
    _in_jobs: int
    _flushed: bool
    _stopped_at: float
    _last_input: float
    _completion: Callable[[], list[Output]]

    def record(
        self, state: str, gateway: str, owner: str, key: str, unix_now: float
    ) -> SessionRecord:
        """What another gateway needs to take the session over."""
        assert self.options is not None
        options = dataclasses.asdict(self.options)
        options.pop("api_key", None)  # never stored
        return SessionRecord(
            session_id=self.session_id,
            state=state,
            gateway=gateway,
            model=self.model,
            options=options,
            key=key,
            samples=self._in_jobs,
            next_seq=self.chunks_total,
            stopped=self._flushed,
            lane=self.lane,
            audio_s=self.audio_s,
            updated_unix=unix_now,
            owner=owner,
            ahead_after_unix=self._ahead_after_unix,
            queued=[[s, ss] for s, ss in sorted(self._jobs_out.stream_seqs.items())][:QUEUED_KEPT],
        )

    @property
    def awaits_first_partial(self) -> bool:
        """Resumed with a turn ahead (``session_record.turn_ahead``), and no partial queued
        since: its next one goes ahead of the queue (``Seating.partials_allowed``)."""
        return self._ahead and not self._partials

    def detach(self) -> list[Output] | None:
        """The connection is gone before the session ended: a resumable session that has
        started waits for its client (its jobs go on, nothing is cancelled); None if it is not
        one (it ends as any other)."""
        if not self.resumable or self.phase not in (Phase.STREAMING, Phase.STOPPED):
            return None
        self.phase = Phase.CLOSED
        self.outcome = DETACHED_OUTCOME
        return [Remember(DETACHED)]

    def step_aside(
        self, exc: ProtocolError, outcome: str = DETACHED_OUTCOME
    ) -> list[Output] | None:
        """A condition of the server's that passes (``exc`` carries a retry-after: a shutdown,
        NATS refusing to serve the session's results) ends this connection: a resumable
        session is detached, not ended, and the close is 1001 (going away), which clients
        answer by resuming (1013 would end the session for them); None if it is not one."""
        if exc.retry_after_s is None or self.phase is Phase.CLOSED:
            return None
        detached = self.detach()
        if detached is None:
            return None
        self.outcome = outcome
        told = Send(ErrorEvent(exc.code, exc.message, exc.retry_after_s))
        return [told, *detached, Close(1001, "going_away", outcome)]

    def taken(self) -> list[Output]:
        """A newer connection resumed the session: this one ends without touching the session's
        jobs or record (they are the newer one's now)."""
        if self.phase is Phase.CLOSED:
            return []
        self.phase = Phase.CLOSED
        self.outcome = "taken"
        self._jobs_out.in_flight.clear()
        message = TAKEN
        return [
            Send(ErrorEvent(ErrorCode.SESSION_TAKEN, message)),
            Close(4409, ErrorCode.SESSION_TAKEN.value, "taken"),
        ]

    def reattached(
        self, record: SessionRecord, after_seq: int, token: str, now: float, *, ahead: bool = False
    ) -> list[Output]:
        """A reconnected client takes back the session ``record`` describes, having every
        result up to ``after_seq``: it hears ``resumed`` (what audio the server holds), then
        the results after ``after_seq`` as they come (replayed from the results stream).
        ``ahead``: its first partial may go ahead of the queue (``session_record.turn_ahead``).

        Raises:
            ProtocolError: the record's options no longer validate, or ``after_seq`` is past
                the session's chunks.
        """
        if self.phase is not Phase.ADMITTING:
            return []
        if after_seq > record.next_seq - 1:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"start.resume.after_seq {after_seq} is past the session's last chunk"
                f" ({record.next_seq - 1})",
            )
        options = StartOptions.from_message(record.options, self.limits)
        # This connection's partials are told from every earlier connection's by the id it was
        # opened under (unique): the same ids would be dropped by JetStream as duplicates
        # (Nats-Msg-Id), and a partial that never comes holds back the session's next ones.
        self._partial_tag = "r" + self.session_id[:12]
        self._ahead_after_unix = record.ahead_after_unix
        self._ahead = ahead
        self._catch_up_s = record.audio_s
        self.session_id = record.session_id
        self.options = options
        self.model = record.model
        self.resume_token = token
        self.resumable = self.kept = True
        self._in_jobs = record.samples
        self._last_input = self._stopped_at = now
        # Where its jobs sit in the stream, as far as the record says: its place in the queue
        # (`queued`) and what its end deletes; the rest (past QUEUED_KEPT) unknown as before.
        stored = {seq: stream_seq for seq, stream_seq in record.queued}
        self._jobs_out = JobLedger(
            in_flight={s: stored.get(s) for s in range(after_seq + 1, record.next_seq)},
            next_seq=after_seq + 1,
        )
        offset_bytes: int | None = None
        if record.stopped:
            self.phase = Phase.STOPPED
            self._flushed = True
            self.intake = None
            self._chunks, self._audio_s, self._lane = record.next_seq, record.audio_s, record.lane
        else:
            self.phase = Phase.STREAMING
            self.intake = AudioIntake(self.limits, options, lane=record.lane)
            self.intake.resume_at(record.next_seq, record.samples)
            if not options.is_file:
                frame = 2 * options.channels
                offset_bytes = record.samples * options.sample_rate // SAMPLE_RATE * frame
        resumed = Resumed(
            record.session_id,
            token,
            record.samples / SAMPLE_RATE,
            record.stopped,
            after_seq,
            offset_bytes,
        )
        return [Send(resumed), Remember(ATTACHED), *self._completion()]
