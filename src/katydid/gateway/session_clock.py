"""A session's clock and its place in the queue (``SessionClock``, a part of ``Session``): when
it times out if nothing happens, what a tick does, and which queue states are news to its
client. Time is an input (``now``), as everywhere in the session."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from katydid.errors import ErrorCode, ProtocolError
from katydid.gateway.events import Queued
from katydid.gateway.outputs import Output, Send
from katydid.gateway.session_queries import Phase, SessionQueries


class SessionClock(SessionQueries):
    """Deadlines, ticks and queue news over the state ``Session`` holds."""

    if not TYPE_CHECKING:
        # No __dict__ for a Session (10,000 waiting sessions); mypy, seeing slots, would
        # refuse the assignments to the attributes Session declares.
        __slots__ = ()
    now: float
    last_queued: tuple[int, int, float] | None
    _last_input: float
    _stopped_at: float
    fail: Callable[[ProtocolError], list[Output]]

    @property
    def deadline(self) -> float:
        """When the session times out if nothing happens (compare with the same clock as
        ``now``): no start, no frame while streaming, or results not complete."""
        limits = self.limits
        if self.phase in (Phase.AWAIT_START, Phase.ADMITTING):
            return self.now + limits.start_timeout_s
        if self.phase is Phase.STREAMING:
            if not self.wants_audio:
                # The adapter is not reading: our backpressure, not the client's silence (jobs
                # still end, at worst 'expired' after job_deadline_s, and free room).
                return float("inf")
            return self._last_input + limits.idle_timeout_s
        if self.phase is Phase.STOPPED:
            return self._stopped_at + limits.result_timeout_s
        return float("inf")

    def progressed(self, now: float) -> None:
        """A worker's result was applied at ``now``: after ``stop``, the result timeout counts
        from it. Counted from ``stop`` alone, it bounded the whole of a long upload's
        transcription (a 4 h file takes ~800 s on one idle worker on an AMD EPYC, longer on a
        busy or slower host: ``timeout``, and its retry the same), where it is meant for a
        session whose results stopped coming."""
        if self.phase is Phase.STOPPED:
            self._stopped_at = max(self._stopped_at, now)

    def resumed(self, now: float) -> None:
        """The adapter reads again after waiting for room: idle time counts from now."""
        self._last_input = max(self._last_input, now)

    def tick(self, now: float) -> list[Output]:
        """The clock says ``now``: a session past its deadline ends with ``timeout`` (4008)."""
        if now < self.deadline:
            return []
        if self.phase in (Phase.AWAIT_START, Phase.ADMITTING):
            message = f"no start message within {self.limits.start_timeout_s:.0f} s"
        elif self.phase is Phase.STREAMING:
            message = f"no message for {self.limits.idle_timeout_s:.0f} s"
        else:
            message = f"no result for {self.limits.result_timeout_s:.0f} s"
        return self.fail(ProtocolError(ErrorCode.TIMEOUT, message))

    def queue_news(self, position: int, eta_s: float, now: float) -> bool:
        """Whether this queue state is news to the client. Far back in the queue a step of one
        place is news to no one: news when the position moved by 10% (or reached the front),
        and at most once per ``queued_interval_s`` (reaching the front excepted), so 2,000
        waiting clients are not 2,000 frames a second. Each frame costs the gateway a send (and
        on loopback the client's receive): in the seed scenario, 43 a session, half the
        gateway's CPU, taken from the workers on a shared host."""
        if not self._jobs_out.stored_count or self.phase is Phase.CLOSED:
            return False
        last = self.last_queued
        if last is not None:
            if position and abs(position - last[0]) < max(1, last[0] // 10):
                return False
            at_front = position == 0 and last[0] != 0
            if not at_front and now - last[2] < self.limits.queued_interval_s:
                return False
            if last[:2] == (position, int(eta_s)):
                return False
        return True

    def queue_status(self, position: int, eta_s: float, now: float) -> list[Output]:
        """Where the oldest unanswered job stands: ``queued`` when it is news."""
        if not self.queue_news(position, eta_s, now):
            return []
        self.last_queued = (position, int(eta_s), now)
        return [Send(Queued(position, eta_s))]
