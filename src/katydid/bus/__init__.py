"""The job bus: what the gateway needs from the queue, as an interface.

``JobBus`` is the gateway's whole view of NATS: publish a job, delete one, announce a cancel,
read the queue's state, and hear results, heartbeats, dead jobs and a lost connection through
``BusHandlers``. ``katydid.bus.nats_bridge.NatsBridge`` is the one implementation that talks to
NATS; ``katydid.bus.memory.MemoryBus`` is an in-memory one that tests drive (under
``trio.testing.MockClock``) and answer by hand.

Only the ``nats_*`` modules here import nats-py: ``nats_connection`` (connect arguments, errors
translated), ``nats_stream`` (the job stream and its consumers), ``nats_pull`` (a worker's pull
lane), ``nats_admin`` (``katydid nats setup|status``, serve's purge) and ``nats_bridge``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from katydid.messages import Job
from katydid.session_record import SessionRecord


@dataclass(frozen=True, slots=True)
class LaneStats:
    pending: int  # waiting in the queue, not yet delivered
    in_progress: int  # delivered, not yet acked
    delivered_stream_seq: int
    redelivered: int = 0


@dataclass(frozen=True, slots=True)
class BusHandlers:
    """Called on the trio thread; none may raise."""

    # A result message body, and who sent it: the NATS user it was published under.
    on_result: Callable[[bytes, str], None]
    on_worker: Callable[[bytes], None]  # a worker heartbeat body
    on_dead_job: Callable[[int, int], None]  # (stream_seq, deliveries): JetStream gave up
    on_lost: Callable[[], None]  # the connection closed for good (being replaced)
    # nats-py reconnected after an outage: results published meanwhile may be gone
    on_reconnected: Callable[[], None] = lambda: None
    # A result read from the results stream for a session this gateway follows (resumed)
    on_replayed: Callable[[bytes, str], None] = lambda _d, _s: None
    # Another connection took a session over: (session id, its owner)
    on_takeover: Callable[[str, str], None] = lambda _i, _o: None


class JobBus(Protocol):
    """The queue as the gateway sees it. Errors are ``katydid.errors.NatsError`` and its
    subclasses (``StreamFull``, ``JobTooLarge``)."""

    results_subject: str  # where workers answer this gateway's jobs
    # The deployment's secret (the same on every gateway of it, once ``run`` started): job and
    # resume tokens are signed with it, so any gateway can take over any session
    secret: bytes
    connected: bool
    lost: bool  # closed for good, not yet replaced

    def attach(self, handlers: BusHandlers) -> None:
        """Where results, heartbeats, dead jobs and a lost connection go (before ``run``)."""

    async def run(self, *, task_status: trio.TaskStatus[object] = ...) -> None:
        """Connect and serve until cancelled; ``started`` once it can publish."""

    async def publish_job(self, model: str, lane: str, job: Job, pcm: bytes) -> int:
        """Queue a job; returns its stream sequence."""

    async def delete_job(self, stream_seq: int) -> bool:
        """Remove a queued job; False if it was already gone."""

    async def probe_store(self) -> None:
        """Store a message no worker takes, and delete it: whether the stream takes jobs now
        (after publishing failed). Raises ``NatsError`` if it does not."""

    async def job_in_stream(self, stream_seq: int) -> bool:
        """Whether a job is still in the stream (not yet acked by a worker, nor deleted)."""

    async def publish_cancel(self, session_id: str) -> None:
        """Tell workers to abort the session's running jobs."""

    async def lane_stats(self, models: Iterable[str]) -> dict[tuple[str, str], LaneStats]:
        """Queue state per (model, lane)."""

    async def put_record(self, record: SessionRecord, *, last: int | None = None) -> int | None:
        """Write a session's record; its new revision. ``last``: only over that revision, else
        None (another connection wrote it since: it took the session over; or it is gone)."""

    async def delete_record(self, session_id: str, *, last: int | None = None) -> None:
        """The session ended for good: its record goes (its jobs left become orphans);
        ``last``: only if still at that revision."""

    async def get_record(self, session_id: str) -> tuple[SessionRecord, int] | None:
        """A session's record and its revision; None if it has none (ended, or past its
        resume window)."""

    async def follow_results(self, session_id: str) -> None:
        """The session's results from the results stream, all of them, to ``on_replayed``."""

    async def unfollow_results(self, session_id: str) -> None:
        """Stop following the session's results."""

    async def gateway_alive(self, gateway_id: str) -> None:
        """This gateway is alive: workers set aside the jobs of sessions whose gateway is not
        heard (it died; their clients may resume them elsewhere)."""

    async def announce_takeover(self, session_id: str, owner: str) -> None:
        """Tell every gateway that ``owner`` serves the session now (``on_takeover``)."""
