"""What the queue loses of a session (``SessionLosses``, a part of ``Session``): a job JetStream
gave up on, a result lost while the gateway reconnected, the connection to NATS lost. Each ends
the chunk (or the session) with a coded error, never in silence."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from katydid.errors import ErrorCode, ProtocolError
from katydid.gateway.outputs import Output
from katydid.gateway.session_queries import SessionQueries
from katydid.messages import JobResult


class SessionLosses(SessionQueries):
    """Losses over the state ``Session`` holds (declared here, kept by ``Session``)."""

    if not TYPE_CHECKING:
        __slots__ = ()
    session_id: str
    receive_result: Callable[[JobResult], list[Output]]
    fail: Callable[[ProtocolError], list[Output]]

    def dead_job(self, stream_seq: int, deliveries: int) -> list[Output]:
        """JetStream gave up on one of the session's jobs: its chunk fails now (instead of
        waiting out ``result_timeout_s``)."""
        return self._chunk_failed(stream_seq, f"no worker finished it in {deliveries} deliveries")

    def lost_result(self, stream_seq: int) -> list[Output]:
        """One of the session's jobs left the stream (a worker answered it) while the
        gateway's connection to NATS was down, and its result with it: its chunk fails now."""
        return self._chunk_failed(
            stream_seq, "its result was lost while the gateway reconnected to NATS (send it again)"
        )

    def _chunk_failed(self, stream_seq: int, why: str) -> list[Output]:
        """The chunk of this stored job (if still unanswered) fails with ``why``."""
        seq = self.seq_of(stream_seq)
        if seq is None:
            return []
        message = f"chunk {seq}: {why}"
        return self.receive_result(
            JobResult(
                job=f"{self.session_id}-{seq}", session=self.session_id, seq=seq, kind="final",
                text="", segments=(), language="", audio_s=0.0, compute_s=0.0, queue_s=0.0,
                worker="", error={"code": ErrorCode.INTERNAL.value, "message": message},
            )
        )  # fmt: skip

    def queue_lost(self) -> list[Output]:
        """The gateway lost its NATS connection: results workers published meanwhile went
        nowhere, so a session waiting for some ends with a coded retry instead of silence."""
        if not self._jobs_out.in_flight:
            return []
        return self.fail(
            ProtocolError(
                ErrorCode.OVERLOADED,
                "the gateway lost its connection to the job queue; results may be lost",
                retry_after_s=5.0,
            )
        )
