"""A session's final jobs, sans-IO: which are in flight, where each sits in the stream, and the
results put back in chunk order.

Rule 1: finals leave in chunk order. A result that arrives early waits (bounded by the jobs in
flight); a duplicate (a redelivered job answered twice), or a result for a job this session
never sent, is ignored.
Rule 2: a job is in flight from the moment it is built until it is answered, its stream
sequence known from its publish's acknowledgement on: a result may come before that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from katydid.messages import JobResult


@dataclass(slots=True)
class JobLedger:
    in_flight: set[int] = field(default_factory=set)  # chunk seqs sent, not yet answered
    stream_seqs: dict[int, int] = field(default_factory=dict)  # of those: seq -> stream seq
    next_seq: int = 0  # next result to deliver
    failed: int = 0  # chunks answered with an error
    _early: dict[int, JobResult] = field(default_factory=dict)

    def sent(self, seq: int) -> None:
        self.in_flight.add(seq)

    def stored(self, seq: int, stream_seq: int) -> bool:
        """The stream holds job ``seq`` at ``stream_seq``; False if it was answered already."""
        if seq not in self.in_flight:
            return False
        self.stream_seqs[seq] = stream_seq
        return True

    def not_sent(self, seq: int) -> None:
        """The job could not be queued."""
        self.in_flight.discard(seq)

    def answered(self, result: JobResult) -> list[JobResult]:
        """A final's result: the results now deliverable, in chunk order."""
        if result.seq not in self.in_flight:
            return []
        self.in_flight.discard(result.seq)
        self.stream_seqs.pop(result.seq, None)
        self._early[result.seq] = result
        out = []
        while self.next_seq in self._early:
            r = self._early.pop(self.next_seq)
            self.next_seq += 1
            self.failed += r.error is not None
            out.append(r)
        return out

    def abandon(self) -> tuple[int, ...]:
        """The session ends: the stream sequences of its unanswered jobs, to cancel. Jobs not
        yet acknowledged stay in flight: ``stored`` says False for them, and they are cancelled
        then."""
        abandoned = tuple(self.stream_seqs.values())
        self.in_flight.difference_update(self.stream_seqs)
        self.stream_seqs.clear()
        return abandoned

    def seq_of(self, stream_seq: int) -> int | None:
        return next((s for s, ss in self.stream_seqs.items() if ss == stream_seq), None)

    @property
    def oldest_stream_seq(self) -> int | None:
        return min(self.stream_seqs.values()) if self.stream_seqs else None
