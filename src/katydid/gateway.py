"""The gateway: trio + trio-websocket, one nursery per connection, no connection-count limit.

It accepts every connection, runs the sans-IO protocol (``protocol.py``), publishes one JetStream
job per utterance chunk through the NATS bridge, and streams results back in order, with queue
position and ETA while the client waits.

Rule 1: the gateway never waits on inference and never refuses a connection because of a count.
Its bounds are per session (frame size, audio length, chunks in flight, timeouts) and the
stream's size; each ends the offending session with a coded error, others carry on.
Rule 2: all sends to one client go through its outbox and one writer task, so a slow reader
blocks only itself (and is cut off after ``send_timeout_s``).
Rule 3: queue state is polled once per ``queue_poll_s`` for all sessions, never per session.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import secrets
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import structlog
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
)

from katydid.audio import DecodedStream, float_to_pcm16
from katydid.catalog import ModelOffer, check_options, choose_model, offers_from, served_name
from katydid.chunker import Chunk
from katydid.config import Config
from katydid.errors import AudioError, ErrorCode, ProtocolError
from katydid.httpd import Response, json_response, serve_http
from katydid.log import SampledLogger
from katydid.messages import Job, JobOptions, JobResult, MessageError, is_model_name
from katydid.metrics import GatewayMetrics
from katydid.natsio import JobTooLarge, LaneStats, NatsBridge, NatsError, StreamFull
from katydid.protocol import Done, ErrorEvent, Limits, Queued, Ready, ServerEvent, ServerProtocol

log = structlog.get_logger("katydid.gateway")
E = TypeVar("E", bound=BaseException)
_DEFAULT_JOB_S = 2.0  # assumed compute per job before any worker has reported
_CLEANUP_S = 10.0  # at shutdown: for deleting the ended sessions' unanswered jobs


@dataclass(slots=True)
class Session:
    proto: ServerProtocol
    outbox_send: trio.MemorySendChannel[ServerEvent | JobResult | ProtocolError]
    outbox_recv: trio.MemoryReceiveChannel[ServerEvent | JobResult | ProtocolError]
    slots: trio.Semaphore
    stream_seqs: dict[int, int] = field(default_factory=dict)  # chunk seq -> stream seq, unanswered
    last_queued: tuple[int, int] | None = None
    partials: int = 0
    started: float = field(default_factory=time.monotonic)
    model: str = ""  # set at start: the model its jobs go to


@dataclass(slots=True)
class WorkerInfo:
    seen: float
    beat: dict[str, Any]  # the worker's last heartbeat, as sent

    @property
    def avg_compute_s(self) -> float | None:
        avg = self.beat.get("avg_compute_s")
        return float(avg) if isinstance(avg, int | float) and avg > 0 else None


def _first(group: BaseExceptionGroup[Any], kind: type[E]) -> E:
    """The first ``kind`` in a group, however deeply nested (nurseries nest their groups)."""
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            with contextlib.suppress(LookupError):
                return _first(exc, kind)
    raise LookupError(f"no {kind.__name__} in {group!r}")


class Gateway:
    """The WebSocket gateway.

    Args:
        cfg: configuration; ``cfg.nats_url`` must point at a NATS server with JetStream.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.gateway_id = uuid.uuid4().hex[:12]
        self.limits = Limits.from_config(cfg)
        self.bridge = NatsBridge(
            cfg,
            self.gateway_id,
            on_result=self._on_result,
            on_worker=self._on_worker,
            on_dead_job=self._on_dead_job,
            on_lost=self._on_nats_lost,
        )
        # Jobs to delete from the stream: ones JetStream gave up on, and the queued jobs of
        # sessions whose client left. Bounded by what the stream itself may hold.
        self._delete_send, self._delete_recv = trio.open_memory_channel[int](cfg.stream_max_msgs)
        self.sessions: dict[str, Session] = {}
        self.workers: dict[str, WorkerInfo] = {}
        # Queue state per (model, lane), from the last poll; the default model's is always
        # polled, others' while a worker serves them.
        self.lanes: dict[tuple[str, str], LaneStats] = {}
        self.default_model = served_name(cfg.model)
        # What /readyz waits for: the models of worker_models (as `katydid serve --workers
        # MODEL=N,...` sets it), else the default model.
        self.expected_models = {served_name(m) for m, _ in cfg.worker_plan()}
        self.sampled = SampledLogger(
            log, burst=cfg.log_sample_burst, window_s=cfg.log_sample_window_s
        )
        self.counters: dict[str, int] = {
            "duplicate_results": 0,
            "orphan_results": 0,
            "forged_results": 0,
        }
        self._token_key = secrets.token_bytes(32)
        self.peak_sessions = 0
        self.metrics = GatewayMetrics(lambda: {k: w.beat for k, w in self.workers.items()})
        self.port: int | None = None
        self.metrics_port: int | None = None
        # Per model: counted into its backlog until the next poll sees them.
        self._published_since_poll: dict[str, int] = {}
        self._lanes_polled_at = -math.inf
        # Partials only while the model's interactive queue is not backed up (finals come
        # first); set by each queue poll.
        self._partials_allowed: dict[str, bool] = {}
        self._accepting: trio.CancelScope | None = None
        self._sessions_scope: trio.CancelScope | None = None
        self._no_sessions = trio.Event()  # set when draining and the last session ended
        self._deletes_pending = 0  # queued job deletions not yet done
        self._infrastructure_stop = trio.Event()

    # --- lifecycle ---

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect to NATS, listen, serve until cancelled. ``started`` gets the bound port.

        Shutdown order, however it is cancelled: stop accepting and end the sessions (each
        queues the deletion of its unanswered jobs and announces its cancel), then delete those
        jobs, then close NATS. The NATS side runs shielded until then: cancelled together with
        the sessions, it closed first and the cleanup went nowhere (jobs transcribed for
        nobody after a SIGTERM).
        """
        async with trio.open_nursery() as outer:
            await outer.start(self._infrastructure)
            try:
                await self._serve(task_status)
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(_CLEANUP_S) as scope:
                        await self._deletions_done()
                    if scope.cancelled_caught:
                        log.warning("shutdown_cleanup_unfinished", jobs=self._deletes_pending)
                    self._infrastructure_stop.set()

    async def _infrastructure(self, *, task_status: trio.TaskStatus[None]) -> None:
        """NATS bridge, queue polls, job deletions and the HTTP endpoints, shielded from the
        cancellation that ends the sessions: they stop when ``run`` says its cleanup is done."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                if self.cfg.metrics_port >= 0:
                    self.metrics_port = await nursery.start(
                        serve_http, self.cfg.metrics_host, self.cfg.metrics_port, self.routes()
                    )
                await nursery.start(self.bridge.run)
                nursery.start_soon(self._poll_queue)
                nursery.start_soon(self._delete_jobs)
                task_status.started()
                await self._infrastructure_stop.wait()
                nursery.cancel_scope.cancel()

    async def _serve(self, task_status: trio.TaskStatus[int]) -> None:
        async with trio.open_nursery() as handlers:
            self._sessions_scope = handlers.cancel_scope
            with trio.CancelScope() as accepting:
                self._accepting = accepting
                server = WebSocketServer(
                    self._handle,
                    await self._listeners(),
                    handler_nursery=handlers,
                    # Twice the bound: a frame over max_frame_bytes reaches the protocol,
                    # which answers too_large before closing with 1009; past twice it, the
                    # WebSocket layer closes with 1009 before it has read the frame whole.
                    max_message_size=2 * self.cfg.max_frame_bytes,
                    connect_timeout=self.cfg.handshake_timeout_s,
                    disconnect_timeout=5,
                )
                await handlers.start(server.run)
                self.port = int(server.port)
                log.info(
                    "gateway_listening",
                    host=self.cfg.host,
                    port=self.port,
                    gateway=self.gateway_id,
                )
                task_status.started(self.port)
                await trio.sleep_forever()

    async def _listeners(self) -> list[trio.SocketListener]:
        """The listening sockets; with ``reuse_port``, bound with SO_REUSEPORT, so that several
        gateway processes on one host share the port (the kernel spreads connections)."""
        if not self.cfg.reuse_port:
            return await trio.open_tcp_listeners(self.cfg.port, host=self.cfg.host)
        listeners = []
        infos = await trio.socket.getaddrinfo(
            self.cfg.host, self.cfg.port, type=trio.socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in infos:
            sock = trio.socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            await sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            listeners.append(trio.SocketListener(sock))
        return listeners

    async def _deletions_done(self) -> None:
        while self._deletes_pending:  # noqa: ASYNC110 - a counter the delete task lowers
            await trio.sleep(0.05)

    async def drain(self) -> None:
        """Stop accepting, then wait (bounded by ``shutdown_grace_s``) for sessions to finish."""
        self.shutdown()
        with trio.move_on_after(self.cfg.shutdown_grace_s):
            if self.sessions:
                await self._no_sessions.wait()

    def cut_grace(self) -> None:
        """End the shutdown grace now: remaining sessions are cancelled."""
        if self._sessions_scope is not None:
            self._sessions_scope.cancel()
        self._no_sessions.set()

    def shutdown(self) -> None:
        """Stop accepting; let sessions finish until ``shutdown_grace_s``; then everything stops."""
        if self._accepting is not None:
            self._accepting.cancel()
        if self._sessions_scope is not None:
            self._sessions_scope.deadline = trio.current_time() + self.cfg.shutdown_grace_s

    # --- callbacks from the NATS thread (run on the trio thread, must not raise) ---

    def job_token(self, job_id: str) -> str:
        """This gateway's proof for a job it publishes (HMAC of the job id under a key made at
        start): no per-job state, and nobody without the key can make one for a job."""
        return hmac.new(self._token_key, job_id.encode(), hashlib.sha256).hexdigest()[:32]

    def _on_result(self, data: bytes) -> None:
        try:
            result = JobResult.from_json(data)
        except MessageError as exc:
            self.sampled.warning("bad_result", error=str(exc))
            return
        if not hmac.compare_digest(result.token, self.job_token(result.job)):
            # Published on our results subject by something that never held the job.
            self.counters["forged_results"] += 1
            self.sampled.warning("forged_result", session=result.session, seq=result.seq)
            return
        self._accept(result)

    def _accept(self, result: JobResult) -> None:
        """Count a result (a worker's, or one the gateway answers itself) and hand it to its
        session's writer."""
        outcome = result.error["code"] if result.error else "ok"
        self.metrics.results.labels(result.kind, outcome).inc()
        if outcome == "ok":
            self.metrics.time_in_queue.observe(result.queue_s)
            self.metrics.transcription.observe(result.compute_s)
            if result.kind == "final":
                self.metrics.audio_seconds.inc(result.audio_s)
        session = self.sessions.get(result.session)
        if session is None:
            self.counters["orphan_results"] += 1  # the client left; its cancel crossed this result
            return
        try:
            session.outbox_send.send_nowait(result)
        except trio.WouldBlock:
            # Results are bounded by jobs in flight, so only duplicates can overflow the outbox.
            self.counters["duplicate_results"] += 1
        except trio.BrokenResourceError:
            self.counters["orphan_results"] += 1

    def _on_dead_job(self, stream_seq: int, deliveries: int) -> None:
        """JetStream will not deliver this job again (every delivery ended without an ack: a
        worker crashed on it each time). Its session hears so now, as that chunk's error,
        instead of waiting out ``result_timeout_s``; the job leaves the stream."""
        # Deleted whoever owns it: a job whose session (or gateway) is gone would otherwise sit
        # in the stream for good, counting against its limits. Every gateway hears the
        # advisory and tries; the owner answers its session from its own records either way.
        self._delete_job(stream_seq)
        owner = next(
            (
                (session_id, seq)
                for session_id, session in self.sessions.items()
                for seq, sseq in session.stream_seqs.items()
                if sseq == stream_seq
            ),
            None,
        )
        if owner is None:
            self.sampled.info("dead_job_unowned", stream_seq=stream_seq, deliveries=deliveries)
            return  # another gateway's job, or a session already gone
        session_id, seq = owner
        self.sampled.warning("job_dead", session=session_id, seq=seq, deliveries=deliveries)
        message = f"chunk {seq}: no worker finished it in {deliveries} deliveries"
        self._accept(
            JobResult(
                job=f"{session_id}-{seq}",
                session=session_id,
                seq=seq,
                kind="final",
                text="",
                segments=(),
                language="",
                audio_s=0.0,
                compute_s=0.0,
                queue_s=0.0,
                worker="",
                error={"code": ErrorCode.INTERNAL.value, "message": message},
            )
        )

    def _on_nats_lost(self) -> None:
        """The NATS connection closed for good (the bridge is replacing it): results workers
        published meanwhile went nowhere, so sessions waiting for some end now with a coded
        retry instead of waiting out result_timeout_s in silence."""
        for session in self.sessions.values():
            if session.stream_seqs:
                # One exception per session: each is raised in its own task (and traceback).
                lost = ProtocolError(
                    ErrorCode.OVERLOADED,
                    "the gateway lost its connection to the job queue; results may be lost",
                    retry_after_s=5.0,
                )
                try:
                    session.outbox_send.send_nowait(lost)
                except (trio.WouldBlock, trio.BrokenResourceError):
                    pass  # its outbox is full of results: it is being answered anyway

    def _delete_job(self, stream_seq: int) -> None:
        try:
            self._delete_send.send_nowait(stream_seq)
        except trio.WouldBlock:
            self.sampled.warning("job_left_in_stream", stream_seq=stream_seq)
            return
        self._deletes_pending += 1

    async def _delete_jobs(self) -> None:
        async for stream_seq in self._delete_recv:
            try:
                if await self.bridge.delete_job(stream_seq):
                    self.sampled.info("job_deleted", stream_seq=stream_seq)
            except NatsError as exc:
                self.sampled.warning("job_delete_failed", stream_seq=stream_seq, error=str(exc))
            finally:
                self._deletes_pending -= 1

    def _on_worker(self, data: bytes) -> None:
        try:
            beat = json.loads(data)
            model = beat.get("model", "")
            if not isinstance(model, str) or not is_model_name(model):
                # Anything on NATS can publish here; a name no subject can hold would make
                # every queue poll fail.
                raise ValueError(f"model {model!r} is not a routable name")
            self.workers[str(beat["id"])] = WorkerInfo(time.monotonic(), dict(beat))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.sampled.warning("bad_worker_heartbeat", error=str(exc))

    # --- queue state, for all sessions at once ---

    def _forget_gone_workers(self) -> None:
        # Worker ids change when a worker restarts (pid in the id): forget the silent ones, so
        # the table (and the metrics labels) stay bounded by the workers really running.
        horizon = time.monotonic() - 30 * self.cfg.worker_heartbeat_s
        for worker_id in [k for k, w in self.workers.items() if w.seen < horizon]:
            del self.workers[worker_id]

    def _serving(self, model: str | None) -> list[WorkerInfo]:
        """Workers of ``model`` (None: all), by their heartbeats."""
        return [w for w in self.workers.values() if model is None or w.beat.get("model") == model]

    def live_workers(self, model: str | None = None) -> int:
        horizon = time.monotonic() - 3 * self.cfg.worker_heartbeat_s
        return sum(1 for w in self._serving(model) if w.seen >= horizon)

    def job_seconds(self, model: str | None = None) -> float:
        known = [w.avg_compute_s for w in self._serving(model) if w.avg_compute_s]
        return sum(known) / len(known) if known else _DEFAULT_JOB_S

    def capacity(self, model: str | None = None) -> tuple[int, float]:
        """``(live workers, mean seconds per job)`` of ``model``'s workers (None: all), what
        every ETA is made of: a model's queue moves only as fast as its own workers."""
        return self.live_workers(model), self.job_seconds(model)

    def eta_s(
        self, jobs_ahead: int, capacity: tuple[int, float] | None = None, model: str | None = None
    ) -> float:
        """Seconds until ``jobs_ahead`` queued jobs are done; pass ``capacity`` when estimating
        for many sessions at once, so the worker table is read once, not once per session."""
        workers, job_s = capacity if capacity is not None else self.capacity(model)
        return (jobs_ahead // max(1, workers) + 1) * job_s

    def backlog_eta_s(self, model: str | None = None, lane: str = "interactive") -> float:
        """ETA of a job queued now for ``model`` (default: the server's default model)."""
        model = model or self.default_model
        stats = self.lanes.get((model, lane))
        ahead = stats.pending + stats.in_progress if stats else 0
        ahead += self._published_since_poll.get(model, 0)
        interactive = self.lanes.get((model, "interactive"))
        if lane == "bulk" and interactive is not None:
            # Interactive jobs go first, but at most bulk_every - 1 of them per bulk job.
            share = self.cfg.bulk_every - 1 if self.cfg.bulk_every > 0 else interactive.pending
            ahead += min(interactive.pending, share * (ahead + 1))
        return self.eta_s(ahead, model=model)

    async def _poll_queue(self) -> None:
        while True:
            published = dict(self._published_since_poll)
            models = {self.default_model, *self.offers()}
            try:
                self.lanes = await self.bridge.lane_stats(sorted(models))
                for model, n in published.items():  # the poll now counts them
                    self._published_since_poll[model] -= n
                self._lanes_polled_at = time.monotonic()
            except NatsError as exc:
                self.sampled.warning("queue_poll_failed", error=str(exc))
            self._forget_gone_workers()
            self._export_queue()
            self.sampled.flush()
            capacities = {model: self.capacity(model) for model in models}
            # Read per audio frame by every streaming session: decided here, once per poll
            # (the lane figures it depends on change only here).
            for model, (workers, _) in capacities.items():
                interactive = self.lanes.get((model, "interactive"))
                self._partials_allowed[model] = interactive is not None and (
                    interactive.pending < max(1, workers)
                )
            for session in list(self.sessions.values()):
                self._update_position(session, capacities.get(session.model))
            await trio.sleep(self.cfg.queue_poll_s)

    def _export_queue(self) -> None:
        m = self.metrics
        for (model, lane), stats in self.lanes.items():
            m.queue_depth.labels(model, lane).set(stats.pending)
            m.queue_in_progress.labels(model, lane).set(stats.in_progress)
            m.jobs_redelivered.labels(model, lane).set(stats.redelivered)
        m.workers_live.set(self.live_workers())
        m.nats_connected.set(1 if self.bridge.connected else 0)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: NATS connected, the stream answered recently, a worker seen, backlog ETA bounded."""
        eta = self.backlog_eta_s()
        offered = self.offers()
        missing = sorted(m for m in self.expected_models if m not in offered)
        checks = {
            "nats_connected": self.bridge.connected,
            "stream_present": time.monotonic() - self._lanes_polled_at
            < 5 * self.cfg.queue_poll_s + 5,
            "workers": self.live_workers() > 0,
            # Every model this deployment is configured to serve has a live worker: a client
            # that waits for /readyz and then names one must not be refused.
            "models_served": not missing,
            "backlog_eta_ok": eta <= self.cfg.ready_max_eta_s,
        }
        return all(checks.values()), checks | {
            "backlog_eta_s": round(eta, 1),
            "workers_live": self.live_workers(),
            "models_missing": missing,
        }

    def routes(self) -> dict[str, Callable[[], Response]]:
        def metrics() -> Response:
            return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)

        def ready() -> Response:
            ok, detail = self.readiness()
            return json_response(200 if ok else 503, {"ready": ok, **detail})

        return {
            "/metrics": metrics,
            "/healthz": lambda: json_response(
                503 if self.bridge.lost else 200,
                {
                    "alive": not self.bridge.lost,
                    "sessions": len(self.sessions),
                    "nats": "closed, being replaced" if self.bridge.lost else "ok",
                },
            ),
            "/readyz": ready,
        }

    def _update_position(self, session: Session, capacity: tuple[int, float] | None = None) -> None:
        if not session.stream_seqs:
            return
        stats = self.lanes.get((session.model, session.proto.lane))
        if stats is None:
            return
        oldest = min(session.stream_seqs.values())
        # Stream sequences are shared by all models' subjects, so this counts other models'
        # jobs between too: an upper bound, exact when one model is served.
        position = max(0, min(stats.pending, oldest - stats.delivered_stream_seq - 1))
        eta = self.eta_s(position, capacity, model=session.model)
        last = session.last_queued
        # Far back in the queue, a step of one place is news to no one: update when the position
        # moved by 5% (or reached the front), so 2,000 waiting clients are not 2,000 frames a second.
        if last is not None and position and abs(position - last[0]) < max(1, last[0] // 20):
            return
        if last == (position, int(eta)):
            return
        session.last_queued = (position, int(eta))
        try:
            session.outbox_send.send_nowait(Queued(position, eta))
        except (trio.WouldBlock, trio.BrokenResourceError):
            pass  # a status update; the next poll sends a fresh one

    # --- one connection ---

    async def _handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        session_id = uuid.uuid4().hex
        send, recv = trio.open_memory_channel[ServerEvent | JobResult | ProtocolError](
            self.cfg.max_jobs_in_flight + 16
        )
        session = Session(
            ServerProtocol(session_id, self.limits),
            send,
            recv,
            trio.Semaphore(self.cfg.max_jobs_in_flight),
        )
        self.sessions[session_id] = session
        self.metrics.active_connections.inc()
        if len(self.sessions) > self.peak_sessions:
            self.peak_sessions = len(self.sessions)
            self.metrics.peak_connections.set(self.peak_sessions)
        bound = log.bind(session_id=session_id)
        outcome = "ok"
        fatal: ProtocolError | None = None
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, ws, session, nursery.cancel_scope)
                    await self._reader(ws, session)
            except* ProtocolError as group:
                fatal = _first(group, ProtocolError)
            except* ConnectionClosed as group:
                # A frame past the WebSocket layer's own limit closes there with 1009.
                reason = _first(group, ConnectionClosed).reason
                outcome = "too_large" if getattr(reason, "code", None) == 1009 else "client_gone"
            except* Exception as group:
                # A bug must end this session, never the gateway (a handler's exception would
                # reach the listener's nursery and stop every session).
                self.sampled.log("error", "session_failed", session_id=session_id, exc_info=group)
                fatal = ProtocolError(ErrorCode.INTERNAL, "the gateway failed on this session")
            if fatal is not None:
                outcome = str(fatal.code)
                await self._fail(ws, fatal)
        finally:
            if outcome == "ok" and not session.proto.done:
                outcome = "incomplete"
                if self._sessions_scope is not None and self._sessions_scope.cancel_called:
                    # Shutdown grace over: tell the client to come back rather than just vanish.
                    outcome = "shutdown"
                    with trio.CancelScope(shield=True):
                        await self._fail(
                            ws,
                            ProtocolError(
                                ErrorCode.OVERLOADED,
                                "the server is shutting down",
                                retry_after_s=5.0,
                            ),
                        )
            session.proto.upload.close()  # a spooled upload's disk file goes with it
            del self.sessions[session_id]
            self.metrics.active_connections.dec()
            self.metrics.sessions.labels(outcome).inc()
            if not self.sessions and self._accepting is not None and self._accepting.cancel_called:
                self._no_sessions.set()
            unanswered = len(session.stream_seqs)
            # Its jobs leave the work queue now: a worker that never heard the cancel below (one
            # started since, say) would otherwise transcribe them for nobody, and they would take
            # stream space until then. The cancel still stops the jobs workers already hold.
            for stream_seq in session.stream_seqs.values():
                self._delete_job(stream_seq)
            if unanswered:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await self.bridge.publish_cancel(session_id)
                    except NatsError as exc:
                        self.sampled.warning("cancel_publish_failed", error=str(exc))
            line = {
                "outcome": outcome,
                "chunks": session.proto.chunks_total,
                "answered": session.proto.chunks_answered,
                "cancelled_jobs": unanswered,
                "audio_s": round(session.proto.done_event().audio_s, 2),
                "duration_s": round(time.monotonic() - session.started, 2),
            }
            if outcome in ("ok",):
                bound.info("session", **line)
            else:
                self.sampled.info("session", session_id=session_id, **line)

    async def _fail(self, ws: WebSocketConnection, exc: ProtocolError) -> None:
        with trio.move_on_after(2):
            try:
                await ws.send_message(
                    ErrorEvent(exc.code, exc.message, exc.retry_after_s).to_json()
                )
                await ws.aclose(exc.close_code, exc.code.value)
            except ConnectionClosed:
                pass

    async def _receive(self, ws: WebSocketConnection, timeout_s: float) -> str | bytes:
        try:
            with trio.fail_after(timeout_s):
                return await ws.get_message()
        except trio.TooSlowError:
            raise ProtocolError(ErrorCode.TIMEOUT, f"no message for {timeout_s:.0f} s") from None

    async def _reader(self, ws: WebSocketConnection, session: Session) -> None:
        proto = session.proto
        while True:
            waiting_start = proto.options is None
            msg = await self._receive(
                ws, self.cfg.start_timeout_s if waiting_start else self.cfg.idle_timeout_s
            )
            if isinstance(msg, bytes):
                for chunk in proto.receive_bytes(msg):
                    await self._publish(session, chunk)
                partial = proto.take_partial(
                    allowed=self._partials_allowed.get(session.model, False)
                )
                if partial is not None:
                    await self._publish_partial(session, *partial)
                continue
            action = proto.receive_text(msg)
            if action == "start":
                if proto.options is not None and proto.options.format != "pcm_s16le":
                    # An upload waits here until stop: memory up to a bound, then disk.
                    proto.upload = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed with the session
                        max_size=self.cfg.upload_memory_bytes, prefix="katydid-upload-"
                    )
                offers = self._admit(session)
                await session.outbox_send.send(
                    Ready(
                        proto.session_id,
                        session.model,
                        tuple(o.to_dict() for o in offers.values()),
                    )
                )
            elif action == "stop":
                break
        # The writer finishes the session; the reader waits for results, bounded, and keeps
        # reading, even while the last chunks are still being decoded and published (a long
        # file's publishing waits on the in-flight bound for minutes): a client that leaves now
        # is noticed at once (and its queued jobs cancelled), not at the next message sent to
        # it, which may be its last result. Anything it sends after stop is out of order.
        with trio.move_on_after(self.cfg.result_timeout_s) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._finish_audio, session)
                while True:
                    try:
                        msg = await ws.get_message()
                    except ConnectionClosed:
                        if proto.done:
                            nursery.cancel_scope.cancel()
                            return  # the writer sent done and is closing; it ends the session
                        raise
                    if isinstance(msg, bytes):
                        proto.receive_bytes(msg)  # raises: audio after stop
                    else:
                        proto.receive_text(msg)  # raises: start or stop again, or garbage
        if scope.cancelled_caught:
            raise ProtocolError(
                ErrorCode.TIMEOUT, f"results not complete within {self.cfg.result_timeout_s:.0f} s"
            )

    async def _finish_audio(self, session: Session) -> None:
        """After stop: decode a file block by block (off the event loop), publishing its chunks
        as they are cut, then the last ones.

        The session holds one decoded block and the chunk being cut, never the file's samples;
        the upload itself waits in a spooled file (``upload_memory_bytes`` in memory, the rest
        on disk). A long file's publishing waits on the in-flight bound, so decoding goes at
        the pace of the workers.
        """
        proto = session.proto
        if proto.options is not None and proto.options.format != "pcm_s16le":
            upload = proto.take_file()
            try:
                stream = await trio.to_thread.run_sync(
                    lambda: DecodedStream(upload, max_audio_s=self.cfg.max_session_s)
                )
            except AudioError as exc:
                raise ProtocolError(ErrorCode.UNSUPPORTED_AUDIO, str(exc)) from None
            with stream:
                proto.begin_decoded(stream.duration_s)
                while True:
                    # Not abandoned on cancel: the block's thread must be done with the
                    # decoder before it is closed (a 10 s block decodes in milliseconds).
                    try:
                        block = await trio.to_thread.run_sync(stream.next_block)
                    except AudioError as exc:
                        raise ProtocolError(ErrorCode.UNSUPPORTED_AUDIO, str(exc)) from None
                    if block is None:
                        break
                    for chunk in proto.receive_decoded(block):
                        await self._publish(session, chunk)
        for chunk in proto.flush():
            await self._publish(session, chunk)
        self._check_done(session)

    def offers(self) -> dict[str, ModelOffer]:
        """The models live workers serve (from their heartbeats)."""
        horizon = time.monotonic() - 3 * self.cfg.worker_heartbeat_s
        return offers_from(
            (
                str(w.beat.get("model", "")),
                w.beat["multilingual"] if isinstance(w.beat.get("multilingual"), bool) else None,
            )
            for w in self.workers.values()
            if w.seen >= horizon and w.beat.get("model")
        )

    def _admit(self, session: Session) -> dict[str, ModelOffer]:
        """At start: the session's model, if it can honour the options (else
        ``unsupported_option``); then refuse (with a retry-after) only if the backlog already
        exceeds max_wait_s. Returns what the server offers, for ``ready``."""
        opts = session.proto.options
        assert opts is not None
        offers = self.offers()
        offer = choose_model(offers, opts.model, self.default_model)
        check_options(offer, offers, language=opts.language, task=opts.task)
        session.model = offer.name
        eta = self.backlog_eta_s(offer.name)
        if eta > opts.max_wait_s:
            self.metrics.overloaded.labels("max_wait").inc()
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"queue ETA {eta:.0f} s exceeds max_wait_s {opts.max_wait_s:.0f}",
                retry_after_s=max(1.0, eta - opts.max_wait_s),
            )
        return offers

    def _job(
        self, session: Session, job_id: str, seq: int, offset_ms: int, deadline_s: float, kind: str
    ) -> Job:
        """A job of this session: its options (words only for finals), this gateway's reply
        subject and token, a deadline ``deadline_s`` from now."""
        opts = session.proto.options
        assert opts is not None
        return Job(
            job_id=job_id,
            session_id=session.proto.session_id,
            seq=seq,
            offset_ms=offset_ms,
            reply_subject=self.bridge.results_subject,
            deadline_unix_ms=int((time.time() + deadline_s) * 1000),
            options=JobOptions(
                language=opts.language,
                word_timestamps=opts.word_timestamps and kind == "final",
                prompt=opts.prompt,
                task=opts.task,
                kind=kind,
            ),
            token=self.job_token(job_id),
        )

    async def _publish(self, session: Session, chunk: Chunk) -> None:
        proto = session.proto
        assert proto.options is not None
        await session.slots.acquire()  # backpressure: the reader waits while too many are in flight
        pcm = float_to_pcm16(chunk.audio)
        job = self._job(
            session,
            f"{proto.session_id}-{chunk.seq}",
            chunk.seq,
            round(chunk.offset_s * 1000),
            self.cfg.job_deadline_s,
            "final",
        )
        try:
            # Shielded (the bridge bounds it by nats_request_timeout_s): a job the server may
            # already hold must have its stream sequence recorded, or a session cancelled
            # meanwhile (its client left) could not delete it, and it would be transcribed for
            # nobody.
            with trio.CancelScope(shield=True):
                stream_seq = await self.bridge.publish_job(session.model, proto.lane, job, pcm)
        except JobTooLarge as exc:
            session.slots.release()
            raise ProtocolError(ErrorCode.TOO_LARGE, f"chunk {chunk.seq}: {exc}") from None
        except StreamFull:
            session.slots.release()
            self.metrics.overloaded.labels("stream_full").inc()
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                "the job queue is full",
                retry_after_s=max(1.0, self.backlog_eta_s(session.model, proto.lane)),
            ) from None
        except NatsError as exc:
            session.slots.release()
            self.metrics.overloaded.labels("nats_unavailable").inc()
            raise ProtocolError(
                ErrorCode.OVERLOADED, f"queue unavailable: {exc}", retry_after_s=5.0
            ) from None
        session.stream_seqs[chunk.seq] = stream_seq
        self._published_since_poll[session.model] = (
            self._published_since_poll.get(session.model, 0) + 1
        )
        self.metrics.jobs_published.labels(proto.lane, "final").inc()
        self._update_position(session)

    async def _publish_partial(self, session: Session, seq: int, audio: np.ndarray) -> None:
        proto = session.proto
        assert proto.options is not None
        session.partials += 1
        job = self._job(
            session,
            f"{proto.session_id}-{seq}-p{session.partials}",
            seq,
            0,
            self.cfg.partial_deadline_s,
            "partial",
        )
        try:
            await self.bridge.publish_job(session.model, "interactive", job, float_to_pcm16(audio))
            self.metrics.jobs_published.labels("interactive", "partial").inc()
        except NatsError:
            proto.partial_dropped()  # best effort: the final for this audio will come anyway

    def _check_done(self, session: Session) -> None:
        if session.proto.done:
            try:
                session.outbox_send.send_nowait(session.proto.done_event())
            except trio.WouldBlock:
                pass  # the writer checks again after draining

    async def _writer(
        self, ws: WebSocketConnection, session: Session, scope: trio.CancelScope
    ) -> None:
        proto = session.proto
        async for item in session.outbox_recv:
            if isinstance(item, ProtocolError):
                raise item  # the session ends with this coded error
            if isinstance(item, JobResult):
                if item.kind == "final" and item.seq in session.stream_seqs:
                    del session.stream_seqs[item.seq]
                    session.slots.release()
                events = proto.receive_result(item)
            else:
                events = [item]
            for event in events:
                await self._send(ws, event)
                if isinstance(event, Done):
                    with trio.move_on_after(2):
                        await ws.aclose(1000, "done")
                    scope.cancel()
                    return
            if isinstance(item, JobResult) and proto.done:
                await self._send(ws, proto.done_event())
                with trio.move_on_after(2):
                    await ws.aclose(1000, "done")
                scope.cancel()
                return

    async def _send(self, ws: WebSocketConnection, event: ServerEvent) -> None:
        try:
            with trio.fail_after(self.cfg.send_timeout_s):
                await ws.send_message(event.to_json())
        except trio.TooSlowError:
            raise ProtocolError(ErrorCode.TIMEOUT, "client does not read its results") from None
