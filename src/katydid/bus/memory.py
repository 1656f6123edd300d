"""An in-memory ``JobBus`` for tests: a job queue with no NATS, answered by hand.

Tests publish through it as the gateway does, then play the workers: ``take`` a job, ``answer``
it (or let JetStream ``give_up`` on it), send heartbeats, ``lose`` the connection. It keeps what
happened (``published``, ``deleted``, ``cancels``) for assertions; it never sleeps, so tests run
it under ``trio.testing.MockClock``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import trio

from katydid.bus import BusHandlers, LaneStats
from katydid.errors import NatsError
from katydid.messages import LANES, Job, JobResult, ResultSegment
from katydid.session_record import SessionRecord


@dataclass(slots=True)
class QueuedJob:
    stream_seq: int
    model: str
    lane: str
    job: Job
    pcm: bytes
    taken: bool = False  # delivered to a (pretend) worker
    deliveries: int = 0


@dataclass(slots=True)
class MemoryBus:
    results_subject: str = "katydid.results.memory"
    connected: bool = True
    lost: bool = False
    queue: dict[int, QueuedJob] = field(default_factory=dict)  # in the stream, by stream seq
    published: list[QueuedJob] = field(default_factory=list)  # every job ever published
    deleted: list[int] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    fail_publish: NatsError | None = None  # the next publishes raise this while set
    # A slow NATS: while this event is not set, publishes wait for it (their PubAck is late)
    publish_gate: trio.Event | None = None
    _seqs: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _delivered: dict[tuple[str, str], int] = field(default_factory=dict)
    _handlers: BusHandlers | None = None
    secret: bytes = b"memory-bus-secret-for-tests-only"
    records: dict[str, SessionRecord] = field(default_factory=dict)  # the sessions bucket
    revisions: dict[str, int] = field(default_factory=dict)
    stored_results: list[JobResult] = field(default_factory=list)  # the results stream
    followed: set[str] = field(default_factory=set)
    takeovers: list[tuple[str, str]] = field(default_factory=list)
    gateway_beats: int = 0

    def attach(self, handlers: BusHandlers) -> None:
        self._handlers = handlers

    async def run(self, *, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        await trio.sleep_forever()

    async def publish_job(self, model: str, lane: str, job: Job, pcm: bytes) -> int:
        await trio.lowlevel.checkpoint()
        if self.publish_gate is not None:
            await self.publish_gate.wait()
        if self.fail_publish is not None:
            raise self.fail_publish
        queued = QueuedJob(next(self._seqs), model, lane, job, pcm)
        self.queue[queued.stream_seq] = queued
        self.published.append(queued)
        return queued.stream_seq

    async def probe_store(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_publish is not None:
            raise self.fail_publish

    async def delete_job(self, stream_seq: int) -> bool:
        await trio.lowlevel.checkpoint()
        self.deleted.append(stream_seq)
        return self.queue.pop(stream_seq, None) is not None

    async def job_in_stream(self, stream_seq: int) -> bool:
        await trio.lowlevel.checkpoint()
        return stream_seq in self.queue

    def reconnect(self) -> None:
        """nats-py reconnected after an outage."""
        self._deliver(lambda h: h.on_reconnected())

    async def publish_cancel(self, session_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.cancels.append(session_id)

    async def lane_stats(self, models: Iterable[str]) -> dict[tuple[str, str], LaneStats]:
        await trio.lowlevel.checkpoint()
        out = {}
        for model in models:
            for lane in LANES:
                jobs = [q for q in self.queue.values() if (q.model, q.lane) == (model, lane)]
                out[model, lane] = LaneStats(
                    pending=sum(not q.taken for q in jobs),
                    in_progress=sum(q.taken for q in jobs),
                    delivered_stream_seq=self._delivered.get((model, lane), 0),
                    redelivered=sum(q.deliveries > 1 for q in jobs),
                )
        return out

    async def put_record(self, record: SessionRecord, *, last: int | None = None) -> int | None:
        await trio.lowlevel.checkpoint()
        if last is not None and self.revisions.get(record.session_id) != last:
            return None
        self.records[record.session_id] = record
        self.revisions[record.session_id] = revision = next(self._seqs)
        return revision

    async def delete_record(self, session_id: str, *, last: int | None = None) -> None:
        await trio.lowlevel.checkpoint()
        if last is not None and self.revisions.get(session_id) != last:
            return
        self.records.pop(session_id, None)
        self.revisions.pop(session_id, None)

    async def get_record(self, session_id: str) -> tuple[SessionRecord, int] | None:
        await trio.lowlevel.checkpoint()
        record = self.records.get(session_id)
        return None if record is None else (record, self.revisions[session_id])

    async def follow_results(self, session_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.followed.add(session_id)
        for data in [r.to_json() for r in self.stored_results if r.session == session_id]:
            self._deliver(partial(_replay, data))

    async def unfollow_results(self, session_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.followed.discard(session_id)

    async def gateway_alive(self, gateway_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.gateway_beats += 1

    async def announce_takeover(self, session_id: str, owner: str) -> None:
        await trio.lowlevel.checkpoint()
        self.takeovers.append((session_id, owner))
        self._deliver(lambda h: h.on_takeover(session_id, owner))

    # --- the test plays the workers ---

    def finals(self, session_id: str | None = None) -> list[QueuedJob]:
        """Final jobs published (of one session), in publishing order."""
        return [
            q
            for q in self.published
            if q.job.options.kind == "final" and session_id in (None, q.job.session_id)
        ]

    def take(self, stream_seq: int) -> QueuedJob:
        """A worker takes this job (it stays in the stream until answered)."""
        queued = self.queue[stream_seq]
        queued.taken = True
        queued.deliveries += 1
        key = (queued.model, queued.lane)
        self._delivered[key] = max(self._delivered.get(key, 0), stream_seq)
        return queued

    def answer(
        self,
        queued: QueuedJob,
        text: str = "",
        *,
        error: dict[str, str] | None = None,
        heard: bool = True,
    ) -> None:
        """A worker's result for this job (acked: it leaves the stream); ``heard=False``: the
        gateway's subscription was down (only the results stream has it)."""
        self.queue.pop(queued.stream_seq, None)
        job = queued.job
        audio_s = len(queued.pcm) / 32_000
        result = JobResult(
            job=job.job_id, session=job.session_id, seq=job.seq, kind=job.options.kind,
            text=text, segments=(ResultSegment(0.0, audio_s, text),) if text else (),
            language="en", audio_s=audio_s, compute_s=0.1, queue_s=0.0, worker="memory-0",
            error=error, token=job.token,
        )  # fmt: skip
        self.stored_results.append(result)
        if not heard:
            return
        self._deliver(lambda h: h.on_result(result.to_json(), "memory"))
        if job.session_id in self.followed:
            self._deliver(lambda h: h.on_replayed(result.to_json(), "memory"))

    def heartbeat(
        self, worker: str, model: str, *, avg_compute_s: float = 1.0, **fields: object
    ) -> None:
        """A worker's heartbeat (``fields``: what else it reports, e.g. busy, fallbacks)."""
        beat = {"id": worker, "model": model, "busy": False, "avg_compute_s": avg_compute_s}
        beat |= fields
        self._deliver(lambda h: h.on_worker(json.dumps(beat).encode()))

    def give_up(self, stream_seq: int, deliveries: int = 4) -> None:
        """JetStream's max-deliveries advisory for this job."""
        self._deliver(lambda h: h.on_dead_job(stream_seq, deliveries))

    def lose(self) -> None:
        """The connection closes for good (and is being replaced)."""
        self.lost = True
        self.connected = False
        self._deliver(lambda h: h.on_lost())

    def _deliver(self, call: Callable[[BusHandlers], None]) -> None:
        assert self._handlers is not None, "attach() first"
        call(self._handlers)


def _replay(data: bytes, handlers: BusHandlers) -> None:
    handlers.on_replayed(data, "memory")
