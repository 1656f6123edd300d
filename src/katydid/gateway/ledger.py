"""A session's final jobs, sans-IO: which are in flight, where each sits in the stream, and the
results put back in chunk order.

Rule 1: finals leave in chunk order. A result that arrives early waits (bounded by the jobs in
flight); a duplicate (a redelivered job answered twice), or a result for a job the session
never sent, is ignored.
Rule 2: a job is in flight from the moment it is built until it is answered, its stream
sequence known from its publish's acknowledgement on: a result may come before that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from katydid.messages import JobResult


@dataclass(slots=True)
class JobLedger:
    # Chunk seqs sent and not yet answered -> their stream seq once stored (None before): one
    # dict, not a set and a dict (a session waiting in the queue holds this for minutes).
    in_flight: dict[int, int | None] = field(default_factory=dict)
    next_seq: int = 0  # next result to deliver
    failed: int = 0  # chunks answered with an error
    # Speech the engine could not get text for (JobResult.uncovered), in session time
    uncovered: list[tuple[float, float]] = field(default_factory=list)
    # Chunks answered with no text and no error (their audio held no words): no final is sent
    # for them, and ``done`` names them, so a client can tell one from a lost final
    silent: list[int] = field(default_factory=list)
    _early: dict[int, JobResult] = field(default_factory=dict)

    def sent(self, seq: int) -> None:
        self.in_flight[seq] = None

    def stored(self, seq: int, stream_seq: int) -> bool:
        """The stream holds job ``seq`` at ``stream_seq``; False if it was answered already."""
        if seq not in self.in_flight:
            return False
        self.in_flight[seq] = stream_seq
        return True

    def not_sent(self, seq: int) -> None:
        """The job could not be queued."""
        self.in_flight.pop(seq, None)

    def answered(self, result: JobResult) -> list[JobResult]:
        """A final's result: the results now deliverable, in chunk order."""
        if result.seq not in self.in_flight:
            return []
        del self.in_flight[result.seq]
        self._early[result.seq] = result
        out = []
        while self.next_seq in self._early:
            r = self._early.pop(self.next_seq)
            self.next_seq += 1
            self.failed += r.error is not None
            self.uncovered += r.uncovered
            if r.error is None and not r.text:
                self.silent.append(r.seq)
            out.append(r)
        return out

    def abandon(self) -> tuple[int, ...]:
        """The session ends: the stream sequences of its unanswered jobs, to cancel. Jobs not
        yet acknowledged stay in flight: ``stored`` says False for them, and they are cancelled
        then."""
        abandoned = tuple(self.stream_seqs.values())
        self.in_flight = {seq: None for seq, stored in self.in_flight.items() if stored is None}
        return abandoned

    @property
    def stream_seqs(self) -> dict[int, int]:
        """Of the jobs in flight, those stored: seq -> stream seq."""
        return {seq: ss for seq, ss in self.in_flight.items() if ss is not None}

    @property
    def stored_count(self) -> int:
        return sum(ss is not None for ss in self.in_flight.values())

    def seq_of(self, stream_seq: int) -> int | None:
        return next((s for s, ss in self.in_flight.items() if ss == stream_seq), None)

    @property
    def oldest_stream_seq(self) -> int | None:
        stored = [ss for ss in self.in_flight.values() if ss is not None]
        return min(stored) if stored else None
