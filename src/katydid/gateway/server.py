"""The gateway: the sessions of every front door, seated on one job bus.

It holds the live sessions and routes what the bus reports (results, dead jobs, a lost
connection, queue state) to them; it admits sessions, publishes their jobs, deletes and cancels
the jobs of sessions that ended, serves the operator endpoints, and shuts down in order. The
front doors are adapters (``websocket.py``) that turn their wire into session inputs.

Rule 1: the gateway never waits on inference and never refuses a connection because of a count.
Its bounds are per session (``Limits``) and the stream's size; each ends the offending session
with a coded error, others carry on.
Rule 2: bus callbacks run on the trio thread and never block or raise: they hand inputs to the
session's inbox, which its adapter applies.
Rule 3: queue state is polled once per ``queue_poll_s`` for all sessions, never per session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from katydid import heap
from katydid.bus import BusHandlers, JobBus
from katydid.config import Config
from katydid.errors import (
    ErrorCode,
    JobTooLarge,
    MessageError,
    NatsError,
    ProtocolError,
    StreamFull,
)
from katydid.gateway.admission import Admission
from katydid.gateway.cleanup import JobCleanup
from katydid.gateway.events import Queued
from katydid.gateway.options import Limits
from katydid.gateway.outputs import Admit, CancelJobs, JobStamp, Output, Publish
from katydid.gateway.session import Session
from katydid.gateway.tenants import Tenant, Tenants
from katydid.gateway.uploads import UploadMemory
from katydid.gateway.window import ByteWindow, Hold
from katydid.httpd import Response, json_response
from katydid.log import SampledLogger
from katydid.messages import SAMPLE_RATE, JobResult
from katydid.metrics import GatewayMetrics

log = structlog.get_logger("katydid.gateway")
_CLEANUP_S = 10.0  # at shutdown: for deleting the ended sessions' unanswered jobs
# After a reconnect, before a job gone from the stream without its result counts as lost: the
# workers' results published just before it may still be on their way.
LOST_RESULT_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class DeadJob:
    stream_seq: int
    deliveries: int


@dataclass(frozen=True, slots=True)
class QueueLost:
    pass


@dataclass(frozen=True, slots=True)
class LostResult:
    stream_seq: int


@dataclass(frozen=True, slots=True)
class Position:
    position: int
    eta_s: float
    at: float  # when it was polled (trio's clock)


Inbound = JobResult | DeadJob | QueueLost | LostResult | Position


def apply(session: Session, item: Inbound) -> list[Output]:
    """What the bus reported, as the session's input."""
    if isinstance(item, JobResult):
        return session.receive_result(item)
    if isinstance(item, DeadJob):
        return session.dead_job(item.stream_seq, item.deliveries)
    if isinstance(item, QueueLost):
        return session.queue_lost()
    if isinstance(item, LostResult):
        return session.lost_result(item.stream_seq)
    return session.queue_status(item.position, item.eta_s, item.at)


MAX_SENDERS_LOGGED = 16  # worker identities named per session (one per worker at most)


@dataclass(slots=True)
class Live:
    """A session being served: the sans-IO core plus what the bus reported to it and its door
    has not applied yet (``inbox``, bounded by the gateway, in order)."""

    session: Session
    door: str = "websocket"
    credential: str | None = None  # the key its door was given (header or query), if any
    tenant: Tenant | None = None  # whose session it is, from admission on (with a keys file)
    queued: int = 0  # its jobs in the stream, as last counted into its tenant
    started: float = field(default_factory=time.monotonic)
    # None while empty: an empty deque is 760 bytes, and a session waiting in the queue has
    # nothing in it between two reports.
    inbox: deque[Inbound] | None = None
    over: bool = False  # closed: nothing more is delivered
    # The door's writer, woken for each item: a door runs a writer only while there is
    # something to write, so a session waiting in the queue is one task, not two.
    on_item: Callable[[], None] | None = None
    _room: trio.Event | None = None  # made by the first wait for room, set by progress
    # Its upload's block being decoded and published: bytes of the gateway's window (window.py)
    hold: Hold | None = None
    # Admitted to this model's queue and no job published yet: counted ahead in its ETA.
    expected: str | None = None
    # The NATS users that answered its jobs (None while none): its log line names them, so a
    # wrong transcript can be traced to the worker identity that sent it.
    answered_by: set[str] | None = None

    def heard_from(self, sender: str) -> None:
        if not sender:
            return
        if self.answered_by is None:
            self.answered_by = set()
        if len(self.answered_by) < MAX_SENDERS_LOGGED:
            self.answered_by.add(sender)

    def deliver(self, item: Inbound, bound: int) -> bool:
        """Queue ``item`` for the door; False if the session is over or ``bound`` items wait."""
        if self.over:
            return False
        if self.inbox is None:
            self.inbox = deque()
        elif len(self.inbox) >= bound:
            return False
        self.inbox.append(item)
        if self.on_item is not None:
            self.on_item()
        return True

    async def wait_for_room(self) -> None:
        """Until the session is below its in-flight bound (results free room)."""
        while not self.session.wants_audio and not self.session.closed:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    def progressed(self) -> None:
        """An item was applied: whoever waits for room looks again."""
        if self._room is not None:
            self._room.set()
            self._room = None


def _clock() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # outside trio.run (unit tests of the bookkeeping)
        return time.monotonic()


class Gateway:
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
        self._inbox_bound = 2 * cfg.max_jobs_in_flight + 16
        if bus is None:
            from katydid.bus.nats_bridge import NatsBridge

            bus = NatsBridge(cfg, self.gateway_id)
        self.bus: JobBus = bus
        bus.attach(
            BusHandlers(
                self._on_result,
                self._on_worker,
                self._on_dead_job,
                self._on_lost,
                self._on_reconnected,
            )
        )
        self._reconnected = trio.Event()
        self.admission = Admission(cfg, _clock)
        self._token_key = secrets.token_bytes(32)
        self.stamp = JobStamp(bus.results_subject, self.job_token, time.time)
        self.sessions: dict[str, Live] = {}
        self.sampled = SampledLogger(
            log, burst=cfg.log_sample_burst, window_s=cfg.log_sample_window_s
        )
        self.cleanup = JobCleanup(bus, cfg, self.sampled)
        self.counters = {"duplicate_results": 0, "orphan_results": 0, "forged_results": 0}
        self.peak_sessions = 0
        self.metrics = GatewayMetrics(
            lambda: {k: w.beat for k, w in self.admission.workers.items()}
        )
        self.uploads = UploadMemory(cfg.upload_memory_total_bytes, cfg.upload_memory_bytes)
        self.metrics.upload_memory.set_function(lambda: self.uploads.held)
        self.metrics.uploads_spilled.set_function(lambda: self.uploads.spilled)
        self.window = ByteWindow(cfg.publish_window_bytes)
        self.metrics.publish_window.set_function(lambda: self.window.used)
        self.metrics.publish_window_waits.set_function(lambda: self.window.waits)
        self.metrics.publish_window_line.set_function(lambda: self.window.waiting)
        keys_file = Path(cfg.api_keys_file).expanduser() if cfg.api_keys_file else None
        self.tenants = Tenants(keys_file, self.metrics, self.sampled)
        self.stopping = False  # no new sessions: the server is shutting down
        # Since when publishing jobs has failed (NATS connected or not), until one lands.
        self.publish_failing_since: float | None = None
        self.websocket_port: int | None = None  # set by the service once the door listens
        # Doors that vouch for their sessions themselves (Wyoming: by network allowlist).
        self.trusted_doors: frozenset[str] = frozenset({"wyoming"})
        self._no_sessions = trio.Event()  # set when stopping and the last session ended

    # --- the bus side, run by the server around its doors ---

    async def run_bus(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The bus, queue polls and the cleanup of ended sessions' jobs, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.bus.run)
            nursery.start_soon(self._poll_queue)
            nursery.start_soon(self.cleanup.run)
            nursery.start_soon(self._find_lost_results)
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
        await self.cleanup.done(_CLEANUP_S)

    def cancel_jobs(self, cancel: CancelJobs) -> None:
        self.cleanup.cancel(cancel)

    # --- bus callbacks (trio thread; must not raise) ---

    def job_token(self, job_id: str) -> str:
        """This gateway's proof for a job it publishes (HMAC of the job id under a key made at
        start): no per-job state, and nobody without the key can make one for a job."""
        return hmac.new(self._token_key, job_id.encode(), hashlib.sha256).hexdigest()[:32]

    def _on_result(self, data: bytes, sender: str = "") -> None:
        try:
            result = JobResult.from_json(data)
        except MessageError as exc:
            self.sampled.warning("bad_result", error=str(exc), sender=sender)
            return
        if not hmac.compare_digest(result.token, self.job_token(result.job)):
            # Published on our results subject by something that never held the job.
            self.counters["forged_results"] += 1
            self.sampled.warning(
                "forged_result", session=result.session, seq=result.seq, sender=sender
            )
            return
        outcome = result.error["code"] if result.error else "ok"
        self.metrics.results.labels(result.kind, outcome).inc()
        if outcome == "ok":
            self.metrics.time_in_queue.observe(result.queue_s)
            self.metrics.transcription.observe(result.compute_s)
            if result.kind == "final":
                self.metrics.audio_seconds.inc(result.audio_s)
        live = self.sessions.get(result.session)
        if live is None:
            self.counters["orphan_results"] += 1  # the client left; its cancel crossed this result
            return
        if result.kind != "partial":  # partials are never counted in the backlog
            self.admission.answered(live.session.model)
        live.heard_from(sender)
        if not self._route(live, result):
            # Results are bounded by jobs in flight, so only duplicates can overflow the inbox.
            self.counters["duplicate_results"] += 1

    def _route(self, live: Live, item: Inbound) -> bool:
        return live.deliver(item, self._inbox_bound)

    def _on_dead_job(self, stream_seq: int, deliveries: int) -> None:
        """JetStream will not deliver this job again (every delivery ended without an ack: a
        worker crashed on it each time). Its session hears so now; the job leaves the stream,
        deleted by every gateway that hears the advisory (a job whose session, or gateway, is
        gone would otherwise sit in the stream for good)."""
        self.cleanup.delete(stream_seq)
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
        self._reconnected.set()

    async def _find_lost_results(self) -> None:
        """After NATS reconnects: a job a worker answered while this gateway's subscription was
        down left the stream (a worker acks after publishing its result) with its result sent
        to nobody (core NATS keeps nothing). Once results sent since then had time to arrive
        (``LOST_RESULT_GRACE_S``), each job of a live session that is gone from the stream and
        still unanswered fails with a coded error (its session ends, never waits in silence:
        a file client once waited past its 120 s in the chaos suite's NATS restart)."""
        while True:
            await self._reconnected.wait()
            self._reconnected = trio.Event()
            await trio.sleep(LOST_RESULT_GRACE_S)
            try:
                lost = await self._route_lost_results()
            except NatsError as exc:  # down again: the check stops, the next reconnect redoes it
                log.warning("lost_results_check_failed", error=str(exc))
                continue
            if lost:
                log.warning("results_lost_in_reconnect", jobs=lost)

    async def _route_lost_results(self) -> int:
        """Each live session's job gone from the stream and still unanswered fails; how many.

        Raises:
            NatsError: JetStream could not be asked (one failed request ends the check, rather
                than one timeout per job left).
        """
        lost = 0
        for live in list(self.sessions.values()):
            for stream_seq in live.session.stored_jobs:
                present = await self.bus.job_in_stream(stream_seq)
                if not present and live.session.seq_of(stream_seq) is not None:
                    lost += 1
                    self._route(live, LostResult(stream_seq))
        return lost

    async def _probe_store(self) -> None:
        """After publishing failed, whether the stream takes jobs again (a freed disk, NATS
        back): /readyz stays not ready until it does, without waiting for a client to try."""
        try:
            await self.bus.probe_store()
        except NatsError as exc:
            self.sampled.warning("jobs_not_stored", error=str(exc))
            return
        self._stored_again()

    def _stored_again(self) -> None:
        """A job (or the probe) was stored: publishing works again, if it had failed."""
        if self.publish_failing_since is None:
            return
        failed_s = trio.current_time() - self.publish_failing_since
        log.info("jobs_stored_again", after_s=round(failed_s, 1))
        self.publish_failing_since = None

    def _on_worker(self, data: bytes) -> None:
        try:
            self.admission.heartbeat(data)
        except ValueError as exc:
            self.sampled.warning("bad_worker_heartbeat", error=str(exc))

    # --- queue state, for all sessions at once ---

    async def _poll_queue(self) -> None:
        adm = self.admission
        while True:
            counted = dict(adm.published_since_poll)
            try:
                adm.polled(await self.bus.lane_stats(adm.polled_models()), counted)
            except NatsError as exc:
                self.sampled.warning("queue_poll_failed", error=str(exc))
            if self.publish_failing_since is not None:
                await self._probe_store()
            adm.forget_gone_workers()
            self.tenants.refresh(trio.current_time())
            self._export_queue()
            self.sampled.flush()
            capacities = adm.capacities()
            now = trio.current_time()
            for live in list(self.sessions.values()):
                s = live.session
                oldest = s.oldest_stream_seq
                if oldest is None:
                    continue
                where = adm.position(
                    s.model, s.lane, oldest, capacities.get(s.model), s.stored_count
                )
                # Only news wakes the session's writer (most polls change nothing for most).
                if where is not None and s.queue_news(*where, now):
                    self._route(live, Position(*where, now))  # full inbox: the next poll retries
            await trio.sleep(self.cfg.queue_poll_s)

    def _export_queue(self) -> None:
        m = self.metrics
        for (model, lane), stats in self.admission.lanes.items():
            m.queue_depth.labels(model, lane).set(stats.pending)
            m.queue_in_progress.labels(model, lane).set(stats.in_progress)
            m.jobs_redelivered.labels(model, lane).set(stats.redelivered)
        m.workers_live.set(self.admission.live_workers())
        m.nats_connected.set(1 if self.bus.connected else 0)

    # --- what the doors call ---

    def open_session(self, door: str = "websocket", credential: str | None = None) -> Live:
        """A new session, registered to hear its results. ``credential``: the API key its
        door was given (a header, a query), if any; checked at admission."""
        session_id = uuid.uuid4().hex
        live = Live(
            Session(session_id, self.limits, self.stamp, _clock()),
            door=door,
            credential=credential,
        )
        self.sessions[session_id] = live
        self.metrics.active_connections.inc()
        if len(self.sessions) > self.peak_sessions:
            self.peak_sessions = len(self.sessions)
            self.metrics.peak_connections.set(self.peak_sessions)
        return live

    def close_session(self, live: Live) -> None:
        """The session is over (its adapter carried out its last outputs): forget it, count it,
        log it (sampled unless it went well)."""
        s = live.session
        self.sessions.pop(s.session_id, None)
        live.over = True
        live.inbox = None
        if live.tenant is not None:
            self.tenants.recount(live.tenant, live.queued, 0)
            live.queued = 0
            self.tenants.close(live.tenant)
        self._arrived(live)
        if s.intake is not None:
            s.intake.upload.close()  # a spooled upload's disk file goes with it
        outcome = s.outcome or "incomplete"
        if self.stopping and not self.sessions:
            self._no_sessions.set()
        self.metrics.active_connections.dec()
        self.metrics.sessions.labels(outcome).inc()
        line = {
            "outcome": outcome,
            "chunks": s.chunks_total,
            "answered": s.chunks_answered,
            "cancelled_jobs": s.cancelled_jobs,
            "audio_s": round(s.audio_s, 2),
            "duration_s": round(time.monotonic() - live.started, 2),
        }
        if live.tenant is not None:
            line["key_name"] = live.tenant.name
        if live.answered_by:
            line["answered_by"] = sorted(live.answered_by)
        if outcome == "ok":
            log.info("session", session_id=s.session_id, **line)
        else:
            self.sampled.info("session", session_id=s.session_id, **line)

    def carry_out(self, live: Live, outputs: list[Output]) -> list[Output]:
        """Do the outputs that need no I/O (admission, cancels); returns the rest, for the
        adapter, in order."""
        rest: list[Output] = []
        for out in outputs:
            if isinstance(out, Admit):
                rest += self.carry_out(live, self._admit(live, out))
            elif isinstance(out, CancelJobs):
                self.cancel_jobs(out)
            else:
                rest.append(out)
        if live.tenant is not None:  # its key's share of the stream, as of now
            queued = live.session.queued_jobs
            self.tenants.recount(live.tenant, live.queued, queued)
            live.queued = queued
        return rest

    def _admit(self, live: Live, admit: Admit) -> list[Output]:
        session = live.session
        if self.stopping:
            return session.shutdown()
        try:
            tenant = self._tenant_of(live, admit)
            model, offers = self.admission.admit(admit.options)
            if tenant is not None:
                self.tenants.open(tenant, _clock())
                live.tenant = tenant
        except ProtocolError as exc:
            if exc.code is ErrorCode.OVERLOADED:
                self.metrics.overloaded.labels("max_wait").inc()
            return session.fail(exc)
        upload = None
        if admit.options.is_file:
            # Counted ahead of the next ones until its first job is published (or it ends):
            # a burst of uploads starting at once each saw an empty queue and all were
            # admitted. Not a live stream: one may be silent for hours (a job when it speaks).
            self.admission.expect(model)
            live.expected = model
            # An upload waits until stop: memory within its bound and the gateway's, then disk.
            upload = self.uploads.upload()
        return session.admitted(model, tuple(o.to_dict() for o in offers.values()), upload)

    def _arrived(self, live: Live) -> None:
        """The session published its first job or ended: no longer counted ahead (``expect``)."""
        if live.expected is not None:
            self.admission.arrived(live.expected)
            live.expected = None

    def refusal(self, live: Live) -> ProtocolError | None:
        """At connect: ``unauthorized`` if the door was given a key (a header, a query) that is
        not valid, so the client hears it at once rather than after its ``start``."""
        if not self.tenants.required or live.credential is None:
            return None
        if live.door in self.trusted_doors:
            return None
        try:
            self.tenants.authenticate(live.credential, live.door)
        except ProtocolError as exc:
            return exc
        return None

    def _tenant_of(self, live: Live, admit: Admit) -> Tenant | None:
        """Whose session it is (None: the gateway is open, without a keys file).

        Raises:
            ProtocolError: ``unauthorized``.
        """
        if not self.tenants.required:
            return None
        if live.door in self.trusted_doors:
            return self.tenants.door_tenant(live.door)
        return self.tenants.authenticate(live.credential or admit.options.api_key, live.door)

    async def publish(
        self,
        live: Live,
        publish: Publish,
        waiting: Callable[[Queued], Awaitable[None]] | None = None,
    ) -> list[Output]:
        """Queue a session's job; returns what the session says next (outputs for the adapter).
        A key at its share of the stream (``max_queued_jobs``) waits here for a seat, after
        ``waiting`` (its client) is told where it stands; its partials are skipped meanwhile."""
        tenant = live.tenant
        if tenant is None:
            return await self._publish(live, publish)
        audio_s = len(publish.pcm) / 2 / SAMPLE_RATE
        if publish.job.options.kind == "partial":
            if not tenant.full:
                return await self._publish(live, publish)
            # Skipped: the session hears so (its next partial may go), as for a refused one.
            skipped = ProtocolError(ErrorCode.OVERLOADED, "the key is at its share of the queue")
            return self.carry_out(live, live.session.publish_failed(publish.job, skipped))
        if tenant.full and live.hold is not None:
            live.hold.release()  # no waiting for a seat inside the window (window.py Rule 1)
        if tenant.full and waiting is not None:
            await waiting(self._seat_news(live, tenant))
        await self.tenants.seat(tenant)
        try:
            live.session.resumed(_clock())  # waiting for a seat is our doing, not idleness
            try:
                self.tenants.check_audio(tenant, _clock())
            except ProtocolError as exc:
                return self.carry_out(live, live.session.publish_failed(publish.job, exc))
            self.tenants.charge(tenant, audio_s, _clock())
            return await self._publish(live, publish)
        finally:
            self.tenants.unseat(tenant)

    def _seat_news(self, live: Live, tenant: Tenant) -> Queued:
        """Where a job waiting for its key's seat stands: behind the key's jobs in the stream
        and the others waiting, each about one job time away once it reaches a worker."""
        s = live.session
        ahead = tenant.queued + tenant.publishing + tenant.waiting
        adm = self.admission
        return Queued(ahead, adm.backlog_eta_s(s.model, s.lane) + adm.eta_s(ahead, model=s.model))

    async def _publish(self, live: Live, publish: Publish) -> list[Output]:
        s = live.session
        job = publish.job
        try:
            # Shielded (the bus bounds it by nats_request_timeout_s): a job the server may
            # already hold must have its stream sequence recorded, or a session that ended
            # meanwhile could not delete it, and it would be transcribed for nobody.
            with trio.CancelScope(shield=True):
                stream_seq = await self.bus.publish_job(
                    publish.model, publish.lane, job, publish.pcm
                )
        except JobTooLarge as exc:
            error = ProtocolError(ErrorCode.TOO_LARGE, f"chunk {job.seq}: {exc}")
        except StreamFull:
            self.metrics.overloaded.labels("stream_full").inc()
            retry = max(1.0, self.admission.backlog_eta_s(publish.model, publish.lane))
            error = ProtocolError(
                ErrorCode.OVERLOADED, "the job queue is full", retry_after_s=retry
            )
        except NatsError as exc:
            self.metrics.overloaded.labels("nats_unavailable").inc()
            if self.publish_failing_since is None:
                self.publish_failing_since = trio.current_time()
            error = ProtocolError(
                ErrorCode.OVERLOADED, f"queue unavailable: {exc}", retry_after_s=5.0
            )
        else:
            self._stored_again()
            kind = job.options.kind
            self.metrics.jobs_published.labels(publish.lane, kind).inc()
            if kind == "partial":
                return []
            self.admission.published(publish.model)
            self._arrived(live)
            return self.carry_out(live, s.published(job.seq, stream_seq))
        return self.carry_out(live, s.publish_failed(job, error))

    def stop(self) -> None:
        """No new sessions (one admitted from now on is told the server is shutting down)."""
        self.stopping = True
        if not self.sessions:
            self._no_sessions.set()

    async def sessions_ended(self) -> None:
        """After ``stop``: until the last session ended."""
        await self._no_sessions.wait()

    def partials_allowed(self, model: str) -> bool:
        return self.admission.partials_allowed.get(model, False)

    # --- operators ---

    def readiness(self) -> tuple[bool, dict[str, object]]:
        # Connected is not enough: a JetStream store with a write error (a full disk) takes no
        # job while every API call answers; /readyz said ready meanwhile.
        storing = self.publish_failing_since is None
        return self.admission.readiness(self.bus.connected, jobs_stored=storing)

    def routes(self) -> dict[str, Callable[[], Response]]:
        def metrics() -> Response:
            return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)

        def ready() -> Response:
            ok, detail = self.readiness()
            return json_response(200 if ok else 503, {"ready": ok, **detail})

        def health() -> Response:
            lost = self.bus.lost
            return json_response(
                503 if lost else 200,
                {
                    "alive": not lost,
                    "sessions": len(self.sessions),
                    # Alive while nats-py reconnects (a restart would not help); said here.
                    "nats": (
                        "closed, being replaced"
                        if lost
                        else "ok"
                        if self.bus.connected
                        else "reconnecting"
                    ),
                },
            )

        return {"/metrics": metrics, "/healthz": health, "/readyz": ready}
