"""The hub: the gateway's live sessions, and what the bus reports routed to them.

It holds the sessions by id (``open_session``/``close_session``) and routes results, dead jobs,
a lost connection and queue positions to their inboxes (``live.py``); a door's driver applies
them. What a session's outputs need (admission, keys, publishing, cleanup) is ``Seating``'s;
the operator routes are ``operator.py``'s.

Rule 1: bus callbacks run on the trio thread and never block or raise: they hand inputs to the
session's inbox, which its door's driver applies.
Rule 2: queue state is polled once per ``queue_poll_s`` for all sessions, never per session
(``queue_poll.py``); results lost in a reconnect are looked for after it (``result_recovery.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import structlog
import trio

from katydid import heap
from katydid.bus import BusHandlers, JobBus
from katydid.config import Config
from katydid.errors import MessageError
from katydid.gateway import operator
from katydid.gateway.admission import Admission
from katydid.gateway.live import (
    DeadJob,
    Inbound,
    Live,
    QueueLost,
    Taken,
    clock,
)
from katydid.gateway.live import summary as session_summary
from katydid.gateway.options import Limits
from katydid.gateway.outputs import JobStamp
from katydid.gateway.queue_poll import poll_queue
from katydid.gateway.result_recovery import ResultRecovery
from katydid.gateway.resumption import Resumption
from katydid.gateway.seating import Seating
from katydid.gateway.session import Session
from katydid.gateway.tenants import Tenants
from katydid.gateway.window import ByteWindow
from katydid.httpd import Response
from katydid.log import SampledLogger
from katydid.messages import JobResult
from katydid.metrics import GatewayMetrics

log = structlog.get_logger("katydid.gateway")
_CLEANUP_S = 10.0  # at shutdown: for deleting the ended sessions' unanswered jobs


class Hub:
    """The sessions and their bus.

    Args:
        cfg: configuration.
        bus: the job bus; by default a ``NatsBridge`` to ``cfg.nats_url``.
    """

    def __init__(self, cfg: Config, *, bus: JobBus | None = None) -> None:
        self.cfg = cfg
        self.gateway_id = uuid.uuid4().hex[:12]
        self.limits = Limits.from_config(cfg)
        # Results are bounded by jobs in flight; the rest is room for queue news and duplicates.
        self.inbox_bound = 2 * cfg.max_jobs_in_flight + 16
        if bus is None:
            from katydid.bus.nats_bridge import NatsBridge

            bus = NatsBridge(cfg, self.gateway_id)
        self.bus: JobBus = bus
        handlers = (self._on_result, self._on_worker, self._on_dead_job, self._on_lost)
        bus.attach(
            BusHandlers(*handlers, self._on_reconnected, self._on_replayed, self._on_takeover)
        )
        self.admission = Admission(cfg, clock)
        self.stamp = JobStamp(bus.results_subject, self.job_token, time.time)
        self.sessions: dict[str, Live] = {}
        self.sampled = SampledLogger(
            log, burst=cfg.log_sample_burst, window_s=cfg.log_sample_window_s
        )
        self.counters = {"duplicate_results": 0, "orphan_results": 0, "forged_results": 0}
        self.peak_sessions = 0
        self.metrics = m = GatewayMetrics(
            lambda: {k: w.beat for k, w in self.admission.workers.items()}
        )
        keys_file = Path(cfg.api_keys_file).expanduser() if cfg.api_keys_file else None
        self.tenants = Tenants(keys_file, m, self.sampled)
        self.seating = Seating(cfg, bus, self.admission, self.tenants, m, self.sampled)
        self.resumption = Resumption(
            cfg, bus, self.gateway_id, self.sessions, self.tenants, self.sampled, m
        )
        self.resumption.on_taken = self._on_takeover_found
        self.recovery = ResultRecovery(
            bus, self.sessions, self.resumption, self._route, cfg.publish_retry_s
        )
        m.upload_memory.set_function(lambda: self.seating.uploads.held)
        m.uploads_spilled.set_function(lambda: self.seating.uploads.spilled)
        self.window = w = ByteWindow(cfg.publish_window_bytes)
        m.publish_window.set_function(lambda: w.used)
        m.publish_window_waits.set_function(lambda: w.waits)
        m.publish_window_line.set_function(lambda: w.waiting)
        self.websocket_port: int | None = None  # set by the service once the door listens
        self._no_sessions = trio.Event()  # set when stopping and the last session ended

    # --- the bus side, run by the server around its doors ---

    async def run_bus(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The bus, queue polls and the cleanup of ended sessions' jobs, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.bus.run)
            nursery.start_soon(poll_queue, self)
            nursery.start_soon(self.seating.cleanup.run)
            nursery.start_soon(self.recovery.run)
            nursery.start_soon(self.resumption.run)
            if self.cfg.malloc_trim_interval_s > 0:
                nursery.start_soon(self._return_freed_memory)
            task_status.started()

    async def _return_freed_memory(self) -> None:
        """Every ``malloc_trim_interval_s``: the heap's free pages back to the system (heap.py),
        in a thread (it walks the heap; the event loop goes on)."""
        while True:
            await trio.sleep(self.cfg.malloc_trim_interval_s)
            await trio.to_thread.run_sync(heap.trim)

    async def cleanup_done(self) -> None:
        """At shutdown, after the sessions ended: until their jobs are deleted and cancelled."""
        await self.seating.cleanup.done(_CLEANUP_S)

    # --- bus callbacks (trio thread; must not raise) ---

    def job_token(self, job_id: str) -> str:
        """The gateways' proof for a job they publish (HMAC of the job id under the
        deployment's secret, the same on every gateway of it, so a gateway that resumes a
        session checks the results of jobs another published): no per-job state, and nobody
        without the secret can make one for a job."""
        mac = hmac.new(self.bus.secret, b"job:" + job_id.encode(), hashlib.sha256)
        return mac.hexdigest()[:32]

    def _checked(self, data: bytes, sender: str) -> JobResult | None:
        """A result message, if it parses and carries its job's token (else counted)."""
        try:
            result = JobResult.from_json(data)
        except MessageError as exc:
            self.sampled.warning("bad_result", error=str(exc), sender=sender)
            return None
        if not hmac.compare_digest(result.token, self.job_token(result.job)):
            # Published on our results subject by something that never held the job.
            self.counters["forged_results"] += 1
            self.sampled.warning(
                "forged_result", session=result.session, seq=result.seq, sender=sender
            )
            return None
        return result

    def _on_replayed(self, data: bytes, sender: str = "") -> None:
        """A result from the results stream, of a session resumed here: its finals come only
        this way (whichever gateway published their jobs); its partials come live."""
        result = self._checked(data, sender)
        if result is None or result.kind == "partial":
            return
        live = self.sessions.get(result.session)
        if live is not None and result.session in self.resumption.followed:
            live.heard_from(sender)
            if not self._route(live, result):
                self.counters["duplicate_results"] += 1

    def _on_takeover(self, session_id: str, owner: str) -> None:
        """Another connection (here or on another gateway) serves the session now."""
        live = self.sessions.get(session_id)
        if live is not None and live.owner and live.owner != owner:
            self.resumption.events.labels("taken_over").inc()
            self._route(live, Taken())

    def _on_takeover_found(self, session_id: str, owner: str) -> None:
        """A write of connection ``owner``'s record found another's: it was taken over."""
        live = self.sessions.get(session_id)
        if live is not None and live.owner == owner:
            self._route(live, Taken())

    def adopt(self, live: Live, opened_as: str) -> None:
        """``live`` resumed a session: it is known by that session's id from now on, not the
        one it was opened under; an older connection of that session here is told it is
        taken."""
        session_id = live.session.session_id
        old = self.sessions.get(session_id)
        if old is not None and old is not live:
            self.resumption.events.labels("taken_over").inc()
            self._route(old, Taken())
        if self.sessions.get(opened_as) is live:
            del self.sessions[opened_as]
        self.sessions[session_id] = live

    def _on_result(self, data: bytes, sender: str = "") -> None:
        result = self._checked(data, sender)
        if result is None:
            return
        self.metrics.result(result)
        if result.kind == "partial":
            self.seating.partial_answered(result.job)  # also when its session is gone
        live = self.sessions.get(result.session)
        if live is None:
            self.counters["orphan_results"] += 1  # the client left; its cancel crossed this result
            return
        if result.kind != "partial":  # partials are never counted in the backlog
            self.admission.answered(live.session.model)
        if result.session in self.resumption.followed and result.kind != "partial":
            return  # a resumed session's finals come from the results stream (_on_replayed)
        live.heard_from(sender)
        if not self._route(live, result):
            # Results are bounded by jobs in flight, so only duplicates can overflow the inbox.
            self.counters["duplicate_results"] += 1

    def _route(self, live: Live, item: Inbound) -> bool:
        return live.deliver(item, self.inbox_bound)

    def _on_dead_job(self, stream_seq: int, deliveries: int) -> None:
        """JetStream will not deliver this job again (every delivery ended without an ack: a
        worker crashed on it each time). Its session hears so now; the job leaves the stream,
        deleted by every gateway that hears the advisory (a job whose session, or gateway, is
        gone would otherwise sit in the stream for good)."""
        self.seating.cleanup.delete(stream_seq)
        for session_id, live in self.sessions.items():
            if live.session.seq_of(stream_seq) is not None:
                self.sampled.warning("job_dead", session=session_id, deliveries=deliveries)
                self._route(live, DeadJob(stream_seq, deliveries))
                return
        self.sampled.info("dead_job_unowned", stream_seq=stream_seq, deliveries=deliveries)

    def _on_lost(self) -> None:
        for live in self.sessions.values():
            if live.session.in_flight:
                self._route(live, QueueLost())

    def _on_reconnected(self) -> None:
        self.recovery.reconnected()

    def _on_worker(self, data: bytes) -> None:
        try:
            self.admission.heartbeat(data)
        except ValueError as exc:
            self.sampled.warning("bad_worker_heartbeat", error=str(exc))

    # --- what the doors call ---

    def open_session(self, door: str = "websocket", credential: str | None = None) -> Live:
        """A new session, registered to hear its results. ``credential``: the API key its
        door was given (a header, a query), if any; checked at admission."""
        session_id = uuid.uuid4().hex
        live = Live(
            Session(session_id, self.limits, self.stamp, clock()),
            door=door,
            credential=credential,
        )
        self.sessions[session_id] = live
        # Every session has a record in NATS; a native one outlives its connection.
        self.resumption.opened(live, resumable=door == "websocket")
        self.metrics.active_connections.inc()
        if len(self.sessions) > self.peak_sessions:
            self.peak_sessions = len(self.sessions)
            self.metrics.peak_connections.set(self.peak_sessions)
        return live

    def close_session(self, live: Live) -> None:
        """The session is over (its driver carried out its last outputs): forget it, count it,
        log it (sampled unless it went well)."""
        s = live.session
        if self.sessions.get(s.session_id) is live:  # (a session taken over is the new one's)
            del self.sessions[s.session_id]
            self.resumption.ended(live)
        live.over = True
        live.inbox = None
        self.seating.release(live)
        if s.intake is not None:
            s.intake.upload.close()  # a spooled upload's disk file goes with it
        if self.seating.stopping and not self.sessions:
            self._no_sessions.set()
        line = session_summary(live)
        self.metrics.active_connections.dec()
        self.metrics.sessions.labels(line["outcome"]).inc()
        if line["outcome"] == "ok":
            log.info("session", session_id=s.session_id, **line)
        else:
            # A budget per outcome: a storm of detached ones does not hide a too_large one.
            kind = (f"session:{line['outcome']}", {"outcome": line["outcome"]})
            self.sampled.info("session", sample_as=kind, session_id=s.session_id, **line)

    def stop(self) -> None:
        """No new sessions (one admitted from now on is told the server is shutting down)."""
        self.seating.stopping = True
        if not self.sessions:
            self._no_sessions.set()

    async def sessions_ended(self) -> None:
        """After ``stop``: until the last session ended."""
        await self._no_sessions.wait()

    def routes(self) -> dict[str, Callable[[], Response]]:
        return operator.routes(self)
