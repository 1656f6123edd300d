"""Seating: what a session's outputs need from the gateway, as one small services object.

A door's driver is the one interpreter of a session's outputs (``driver.py``); what it cannot do
by itself (decide a model and a key at ``Admit``, queue a ``Publish`` within the key's share,
delete the jobs of ``CancelJobs``) it asks of ``Seating``, which answers with the session's next
outputs and never carries them out itself.

Rule 1: the gateway never waits on inference and never refuses a connection because of a count;
a key waits for a seat in the queue (``tenants.seat``), a full stream or a NATS outage is
``overloaded`` with a retry-after.
Rule 2: a job the stream may hold has its stream sequence recorded (the publish is shielded),
or a session that ended meanwhile could not delete it, and it would be transcribed for nobody.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

import structlog
import trio

from katydid.audio import SAMPLE_RATE
from katydid.bus import JobBus
from katydid.config import Config
from katydid.errors import ErrorCode, JobTooLarge, NatsError, ProtocolError, StreamFull
from katydid.gateway.admission import Admission
from katydid.gateway.cleanup import JobCleanup
from katydid.gateway.events import Queued
from katydid.gateway.live import Live, clock
from katydid.gateway.outputs import Admit, Output, Publish
from katydid.gateway.tenants import Tenant, Tenants
from katydid.gateway.uploads import UploadMemory
from katydid.log import SampledLogger
from katydid.metrics import GatewayMetrics

log = structlog.get_logger("katydid.gateway")
# A partial unanswered this long after its deadline is taken as lost (a worker that started it
# just before its deadline has answered by then: partials are a few seconds of audio).
_PARTIAL_DECODE_S = 5.0


class Seating:
    """Admission, keys, the job publisher and the cleanup of ended sessions' jobs."""

    def __init__(
        self,
        cfg: Config,
        bus: JobBus,
        admission: Admission,
        tenants: Tenants,
        metrics: GatewayMetrics,
        sampled: SampledLogger,
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.admission = admission
        self.tenants = tenants
        self.metrics = metrics
        self.cleanup = JobCleanup(bus, cfg, sampled)
        self.uploads = UploadMemory(cfg.upload_memory_total_bytes, cfg.upload_memory_bytes)
        self.sampled = sampled
        self.stopping = False  # no new sessions: the server is shutting down
        # Since when publishing jobs has failed (NATS connected or not), until one lands.
        self.publish_failing_since: float | None = None
        # Doors that vouch for their sessions themselves (Wyoming: by network allowlist).
        self.trusted_doors: frozenset[str] = frozenset({"wyoming"})
        # Partial jobs queued and not answered yet, gateway-wide, in publish order: job id ->
        # (model, when it stops counting). A partial nobody answers (its worker died, its
        # result crossed a reconnect) stops counting once a worker would no longer start it.
        self._partials: OrderedDict[str, tuple[tuple[str, str], float]] = OrderedDict()
        self._partials_of: dict[tuple[str, str], int] = {}  # (model, lane) -> in flight

    # --- admission and keys ---

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

    def admit(self, live: Live, admit: Admit) -> list[Output]:
        session = live.session
        if self.stopping:
            return session.shutdown()
        try:
            tenant = self._tenant_of(live, admit)
            model, offers = self.admission.admit(admit.options)
            if tenant is not None:
                self.tenants.open(tenant, clock())
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

    def arrived(self, live: Live) -> None:
        """The session published its first job or ended: no longer counted ahead (``expect``)."""
        if live.expected is not None:
            self.admission.arrived(live.expected)
            live.expected = None

    def recount(self, live: Live) -> None:
        """The key's share of the stream, as of now."""
        if live.tenant is not None:
            queued = live.session.queued_jobs
            self.tenants.recount(live.tenant, live.queued, queued)
            live.queued = queued

    def release(self, live: Live) -> None:
        """The session is over: its key's share and seat go back, it is no longer expected."""
        if live.tenant is not None:
            self.tenants.recount(live.tenant, live.queued, 0)
            live.queued = 0
            self.tenants.close(live.tenant)
        self.arrived(live)

    def partials_allowed(self, model: str, *, resumed: bool = False) -> bool:
        """Whether a session of ``model`` may queue a partial now: its interactive queue is not
        backed up (as of the last poll), and fewer partials of this gateway are in flight than
        the model's partial slots (``Admission.partial_slots``: a worker left for finals).
        Partials share the workers with finals; with one partial of every live session in the
        queue, a final waited behind all of them (10 live streams on 2 workers: p90 end of
        speech → final 1.9 s). Under load the partials come less often.

        ``resumed``: the session's first partial since its client reconnected. It goes to the
        priority lane, ahead of every queued job, backlog or not: the client's first sign that
        the session is back, not a turn behind every live session's finals (50 live streams
        over 2 workers' capacity, a gateway killed, AMD EPYC 2 cores: reconnect -> first result
        waited for the next final, p50 2.5-5.6 s; 1.4-1.7 s with it). Bounded: one per resume, and at most
        ``resume_first_partials`` of this gateway's in flight per model (past it: False, the
        next frame asks again); with 0, it goes over the slots only (the backlog check holds).
        """
        ahead = self.cfg.resume_first_partials
        if resumed and ahead > 0:
            return self._room(model, "priority", ahead)
        if not self.admission.partials_allowed.get(model, False):
            return False
        if resumed:
            return True
        return self._room(model, "interactive", self.admission.partial_slots.get(model, 1))

    def _room(self, model: str, lane: str, bound: int) -> bool:
        """Fewer of this gateway's partials of ``model`` in ``lane`` in flight than ``bound``;
        asked per audio frame, so the stale ones are forgotten only when it looks full."""
        if self._partials_of.get((model, lane), 0) < bound:
            return True
        self._forget_stale_partials()
        return self._partials_of.get((model, lane), 0) < bound

    def partial_queued(self, model: str, lane: str, job_id: str) -> None:
        """A partial job is in the stream: it holds one of the model's partial slots (or of its
        priority lane's) until ``partial_answered`` (or its deadline and the longest decode
        after it have passed)."""
        until = clock() + self.cfg.partial_deadline_s + _PARTIAL_DECODE_S
        self._partials[job_id] = ((model, lane), until)
        self._partials_of[model, lane] = self._partials_of.get((model, lane), 0) + 1

    def partial_answered(self, job_id: str) -> None:
        """A worker answered a partial (text, or skipped): its slot is free."""
        entry = self._partials.pop(job_id, None)
        if entry is not None:
            self._drop_partial(entry[0])

    def _forget_stale_partials(self) -> None:
        now = clock()
        while self._partials:
            job_id, (where, until) = next(iter(self._partials.items()))
            if until > now:
                return
            del self._partials[job_id]
            self._drop_partial(where)

    def _drop_partial(self, where: tuple[str, str]) -> None:
        left = self._partials_of.get(where, 0) - 1
        if left > 0:
            self._partials_of[where] = left
        else:
            self._partials_of.pop(where, None)

    # --- publishing ---

    async def publish(
        self,
        live: Live,
        publish: Publish,
        waiting: Callable[[Queued], Awaitable[None]] | None = None,
    ) -> list[Output]:
        """Queue a session's job; returns what the session says next. A key at its share of
        the stream (``max_queued_jobs``) waits here for a seat, after ``waiting`` (its client)
        is told where it stands; its partials are skipped meanwhile."""
        tenant = live.tenant
        if tenant is None:
            return await self._publish(live, publish)
        audio_s = len(publish.pcm) / 2 / SAMPLE_RATE
        if publish.job.options.kind == "partial":
            if not tenant.full:
                return await self._publish(live, publish)
            # Skipped: the session hears so (its next partial may go), as for a refused one.
            skipped = ProtocolError(ErrorCode.OVERLOADED, "the key is at its share of the queue")
            return live.session.publish_failed(publish.job, skipped)
        if tenant.full and live.hold is not None:
            live.hold.release()  # no waiting for a seat inside the window (window.py Rule 1)
        if tenant.full and waiting is not None:
            await waiting(self._seat_news(live, tenant))
        await self.tenants.seat(tenant)
        try:
            live.session.resumed(clock())  # waiting for a seat is our doing, not idleness
            try:
                self.tenants.check_audio(tenant, clock())
            except ProtocolError as exc:
                return live.session.publish_failed(publish.job, exc)
            self.tenants.charge(tenant, audio_s, clock())
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
            with trio.CancelScope(shield=True):  # Rule 2 (the bus bounds it in time)
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
            self.stored_again()
            kind = job.options.kind
            self.metrics.jobs_published.labels(publish.lane, kind).inc()
            if kind == "partial":
                self.partial_queued(publish.model, publish.lane, job.job_id)
                return []
            self.admission.published(publish.model)
            self.arrived(live)
            return s.published(job.seq, stream_seq)
        return s.publish_failed(job, error)

    async def probe_store(self) -> None:
        """After publishing failed, whether the stream takes jobs again (a freed disk, NATS
        back): /readyz stays not ready until it does, without waiting for a client to try."""
        try:
            await self.bus.probe_store()
        except NatsError as exc:
            self.sampled.warning("jobs_not_stored", error=str(exc))
            return
        self.stored_again()

    def stored_again(self) -> None:
        """A job (or the probe) was stored: publishing works again, if it had failed."""
        if self.publish_failing_since is None:
            return
        failed_s = trio.current_time() - self.publish_failing_since
        log.info("jobs_stored_again", after_s=round(failed_s, 1))
        self.publish_failing_since = None
