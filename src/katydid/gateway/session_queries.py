"""What a session says of itself (``SessionQueries``, a part of ``Session``): its phase, its
counts, and its jobs in flight as the gateway and the doors see them. Pure reads."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from katydid.gateway.events import Done
from katydid.gateway.intake import AudioIntake
from katydid.gateway.ledger import JobLedger
from katydid.gateway.options import Limits


class Phase(Enum):
    AWAIT_START = "await_start"
    ADMITTING = "admitting"
    STREAMING = "streaming"
    STOPPED = "stopped"
    CLOSED = "closed"


class SessionQueries:
    """Reads of the state ``Session`` holds (declared here, kept by ``Session``)."""

    if not TYPE_CHECKING:
        # No __dict__ for a Session (10,000 waiting sessions); mypy, seeing slots, would
        # refuse the assignments to the attributes Session declares.
        __slots__ = ()
    limits: Limits
    phase: Phase
    intake: AudioIntake | None
    _lane: str
    _chunks: int
    _audio_s: float
    _jobs_out: JobLedger

    @property
    def lane(self) -> str:
        return self.intake.lane if self.intake is not None else self._lane

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def in_flight(self) -> int:
        """Finals published (or being published) and not yet answered."""
        return len(self._jobs_out.in_flight)

    @property
    def queued_jobs(self) -> int:
        """Finals in the stream (publish acknowledged), not yet answered."""
        return self._jobs_out.stored_count

    @property
    def wants_audio(self) -> bool:
        """Below the in-flight bound: the adapter may read (or decode) more audio. The bound is
        checked before each frame, so it is exceeded by at most one frame's chunks."""
        return len(self._jobs_out.in_flight) < self.limits.max_jobs_in_flight

    @property
    def oldest_stream_seq(self) -> int | None:
        return self._jobs_out.oldest_stream_seq

    def seq_of(self, stream_seq: int) -> int | None:
        return self._jobs_out.seq_of(stream_seq)

    @property
    def stored_count(self) -> int:
        """How many of the session's jobs in flight are stored in the stream."""
        return len(self._jobs_out.stream_seqs)

    @property
    def stored_jobs(self) -> list[int]:
        """The stream seqs of the session's jobs in flight that are stored in the stream."""
        return list(self._jobs_out.stream_seqs.values())

    @property
    def chunks_total(self) -> int:
        return self.intake.chunker.chunks_emitted if self.intake else self._chunks

    @property
    def chunks_answered(self) -> int:
        return self._jobs_out.next_seq

    @property
    def audio_s(self) -> float:
        return self.intake.audio_s if self.intake else self._audio_s

    def done_event(self) -> Done:
        return Done(
            self.chunks_total,
            self.audio_s,
            self._jobs_out.failed,
            tuple(self._jobs_out.uncovered),
            tuple(self._jobs_out.silent),
        )
