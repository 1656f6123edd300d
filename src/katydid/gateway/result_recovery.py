"""Results a worker published while this gateway's NATS subscription was down.

A worker acks a job after publishing its result, so a job answered while the gateway was away
has left the stream with its result sent to nobody over core NATS, but kept in the results
stream. After a reconnect each live session with jobs unanswered reads its results from there
(as a resumed session does), so they arrive after all. Once that had time
(``LOST_RESULT_GRACE_S``), each job of a live session that is gone from the stream and still
unanswered (its result not stored either: NATS itself lost it) fails with a coded error: its
session ends, never waits in silence.

Rule 1: one failed request ends a check (rather than one timeout per job left); the check is
tried again once a second for ``retry_s``, then given up until the next reconnect.
Rule 2: following the sessions' results is retried the same way before the lost are counted:
right after a reconnect NATS may still be electing a stream's leader (4.5-9 s for a local
3-node cluster on a 2-core AMD EPYC),
and a session not followed would have its results counted lost; a check given up left its
sessions waiting for results that never come (until ``result_timeout_s``).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import trio

from katydid.bus import JobBus
from katydid.errors import NatsError
from katydid.gateway.live import Inbound, Live, LostResult
from katydid.gateway.resumption import Resumption

log = structlog.get_logger("katydid.gateway")
# After a reconnect, before a job gone from the stream without its result counts as lost: the
# workers' results published just before it may still be on their way.
LOST_RESULT_GRACE_S = 5.0


class ResultRecovery:
    """Runs after each reconnect of the bus (``reconnected``), over the live ``sessions``;
    ``route`` hands a session what it must hear."""

    def __init__(
        self,
        bus: JobBus,
        sessions: dict[str, Live],
        resumption: Resumption,
        route: Callable[[Live, Inbound], bool],
        retry_s: float = 15.0,
    ) -> None:
        self.bus = bus
        self.retry_s = retry_s
        self.sessions = sessions
        self.resumption = resumption
        self.route = route
        self._reconnected = trio.Event()

    def reconnected(self) -> None:
        """The bus is back (a bus callback: trio thread, never blocks)."""
        self._reconnected.set()

    async def run(self) -> None:
        """Until cancelled: after each reconnect, the results recovered, then the lost failed."""
        while True:
            await self._reconnected.wait()
            self._reconnected = trio.Event()
            await self._recover()
            await trio.sleep(LOST_RESULT_GRACE_S)
            deadline = trio.current_time() + self.retry_s
            while True:
                try:
                    lost = await self._fail_lost()
                except NatsError as exc:
                    if trio.current_time() >= deadline:
                        log.warning("lost_results_check_failed", error=str(exc))
                        break
                    await trio.sleep(1.0)
                    continue
                if lost:
                    log.warning("results_lost_in_reconnect", jobs=lost)
                break

    async def _fail_lost(self) -> int:
        """Each live session's jobs gone from the stream and still unanswered fail (a job
        failed by an earlier try is no longer unanswered: a second try skips it)."""
        lost = 0
        for live in list(self.sessions.values()):
            for stream_seq in live.session.stored_jobs:
                present = await self.bus.job_in_stream(stream_seq)
                if not present and live.session.seq_of(stream_seq) is not None:
                    lost += 1
                    self.route(live, LostResult(stream_seq))
        return lost

    async def _recover(self) -> None:
        """Every live session waiting for results reads them from the results stream from now
        on (those published while the subscription was down, and the rest)."""
        if not self.resumption.enabled:
            return  # no results stream: resumption is off
        followed = self.resumption.followed
        deadline = trio.current_time() + self.retry_s
        while True:
            recovering = [
                s.session_id
                for live in list(self.sessions.values())
                if (s := live.session).in_flight and s.session_id not in followed
            ]
            session_id = ""
            try:
                for session_id in recovering:
                    followed.add(session_id)  # before: its replayed results are taken as its
                    await self.bus.follow_results(session_id)
                return
            except NatsError as exc:
                followed.discard(session_id)  # not following: the next try redoes it
                if trio.current_time() >= deadline:
                    log.warning("results_recovery_failed", error=str(exc))
                    return
            await trio.sleep(1.0)
