"""The worker process: pull one job, transcribe it, publish the result, then ack.

anyio on the asyncio backend with nats-py (no trio here). One process holds one model.

Rule 1: a job is acked only after its result is published, on the same connection: NATS
processes a connection's messages in order, so the ack never takes effect before the result is
routed, and a crash before either means redelivery, never loss. No flush between them: it cost
a round trip per job while the worker sat idle (the next fetch's round trip sends both anyway).
Rule 2: the interactive lane is tried first, every ``bulk_every``-th job from bulk when it has
any (``job_order.py`` Rule 1).
Rule 3: while whisper.cpp runs in a thread, the event loop keeps the job alive with
``in_progress()`` and watches for the session's cancellation (whisper.cpp's abort callback).
Rule 4: every job ends in exactly one result: final, or an error (``cancelled``, ``expired``,
``orphaned``, ``bad_job``, ``internal``). Deliveries are bounded by the consumer's max_deliver.
Rule 5: SIGTERM/SIGINT: finish the current job, stop fetching, nak the jobs set aside (no
delay: another worker takes them), unsubscribe, drain, exit.
Rule 6: before engine time, whoever will read the result is asked after (``audience.py``
Rule 1): a job whose session has no record is ``orphaned``.
Rule 7: a job whose session waits for its client is set aside, unanswered, while other jobs are
decoded (``audience.py`` Rule 2, ``set_aside.py``); which job comes next is ``job_order.py``'s
(Rule 2). One decoded only because nothing else was queued gives way to a job fetched meanwhile:
its decode stops and it goes back aside, unanswered (``job_order.py`` Rule 5).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import numpy as np
import structlog

from katydid.audio import SAMPLE_RATE, pcm16_to_float
from katydid.bus.accounts import DEFAULT_WORKER_USERS, worker_inbox_prefix
from katydid.bus.nats_connection import connect
from katydid.bus.nats_pull import PullLane
from katydid.bus.nats_stream import await_consumers, ensure_stream
from katydid.catalog import served_name
from katydid.config import Config
from katydid.errors import AudioError, KatydidError, MessageError
from katydid.lifecycle import until_signalled
from katydid.log import SampledLogger
from katydid.messages import (
    CANCEL_SUBJECT,
    LANES,
    STREAM,
    WORKERS_SUBJECT,
    Job,
    JobResult,
    ResultError,
    consumer_name,
    sender_token,
)
from katydid.sdnotify import notify
from katydid.session_record import GATEWAYS_SUBJECT
from katydid_worker.audience import Audience
from katydid_worker.engine import Engine
from katydid_worker.engine_build import build_info, has_fast_kernels
from katydid_worker.engine_options import DecodeOptions, EngineOptions
from katydid_worker.job_order import JobOrder
from katydid_worker.job_result import answer, result_segments
from katydid_worker.set_aside import keep_alive
from katydid_worker.worker_stats import WorkerStats

log = structlog.get_logger("katydid.worker")


class Worker:
    def __init__(self, cfg: Config, model_path: Path, worker_id: str | None = None) -> None:
        self.cfg = cfg
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.engine = Engine(
            model_path,
            EngineOptions(
                language=cfg.language,
                threads=cfg.engine_threads,
                beam_size=cfg.beam_size,
                calibration_cache=cfg.calibration_cache,
                pieces=cfg.engine_pieces,
            ),
        )
        self.model = served_name(cfg.model)  # the jobs it takes are routed by this name
        self.stats = WorkerStats(self.worker_id, self.model, self.engine.multilingual)
        self._stopping = anyio.Event()
        self._nc: Any = None
        # Garbage on the job subject is taken and dropped as fast as it arrives: sampled.
        self._sampled = SampledLogger(
            log, burst=cfg.log_sample_burst, window_s=cfg.log_sample_window_s
        )
        self._audience = Audience(cfg, self.worker_id, self._request, self._sampled)
        self._order = JobOrder(
            cfg, self.worker_id, self._audience, self.stats, self._sampled, self._stopping
        )

    def stop(self) -> None:
        """Finish the current job, then exit (what SIGTERM does)."""
        self._stopping.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_parent, tg.cancel_scope)
            await self._serve()
            tg.cancel_scope.cancel()

    async def _serve(self) -> None:
        # nats-py's default callbacks print multi-line tracebacks (through logging) for every
        # failed reconnect during an outage: one structured line each instead, sampled.
        leaving = anyio.Event()

        async def error(exc: Exception) -> None:
            self._sampled.warning("nats_error", worker=self.worker_id, error=repr(exc))

        async def disconnected() -> None:
            if not leaving.is_set():  # (the drain at the end disconnects too: not news)
                self._sampled.warning("nats_disconnected", worker=self.worker_id)

        async def reconnected() -> None:
            log.info("nats_reconnected", worker=self.worker_id)
            self._audience.listening()  # beats were missed meanwhile: not silent gateways

        self._nc = await connect(
            self.cfg,
            f"katydid-worker-{self.worker_id}",
            error_cb=error,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            # Its replies and pulled jobs on an inbox only its NATS user may read (accounts.py).
            inbox_prefix=worker_inbox_prefix(self.cfg.nats_user or DEFAULT_WORKER_USERS[0]),
        )
        js = self._nc.jetstream()
        await ensure_stream(js, self.cfg, configure=False)
        # A gateway creates this model's consumers when it hears this worker: heard now.
        async with anyio.create_task_group() as beating:
            beating.start_soon(self._heartbeat)
            await await_consumers(js, self.model)
            beating.cancel_scope.cancel()
        subs = {
            lane: PullLane(
                self._nc,
                await js.pull_subscribe_bind(
                    durable=consumer_name(self.model, lane), stream=STREAM
                ),
                consumer_name(self.model, lane),
                self.cfg.nats_request_timeout_s,
            )
            for lane in LANES
        }
        await self._nc.subscribe(CANCEL_SUBJECT, cb=self._audience.on_cancel)
        await self._nc.subscribe(f"{GATEWAYS_SUBJECT}.*", cb=self._audience.on_gateway)
        self._audience.listening()
        info = build_info()
        log.info(
            "worker_ready",
            worker=self.worker_id,
            model=self.model,
            engine_build=info,
            # What this worker measured when it loaded (or read back from an earlier worker's
            # measurement on this host: calibration="cached"): a near-empty clip's full-window
            # CPU time, and the CPU budget of a clip-sized attempt per size (guardrails.py).
            full_window_s=round(self.engine.full_window_s, 3),
            attempt_budget_s={k: round(v, 3) for k, v in self.engine.budgets_s.items()},
            calibration=self.engine.calibration,
        )
        if not has_fast_kernels(info):
            log.warning(
                "engine_build_slow",
                worker=self.worker_id,
                hint="whisper.cpp lacks llamafile kernels; see docs/engine.md, 'Engine build'",
            )
        notify("READY=1")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat)
                tg.start_soon(self._watch_signals)
                every_s = max(0.5, self.cfg.consumer_ack_wait_s / 3)
                tg.start_soon(keep_alive, self._order.held, every_s)
                while not self._stopping.is_set():
                    msg, fresh = await self._order.next_job(subs)
                    if msg is not None:
                        with anyio.CancelScope(shield=True):  # a started job always finishes
                            idle = self._order.idle is not None  # it gives way (Rule 7)
                            await self._handle(
                                msg, may_set_aside=fresh, lanes=subs if idle else None
                            )
                tg.cancel_scope.cancel()
        finally:
            leaving.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                try:
                    await self._order.give_back_aside()
                    for sub in subs.values():
                        await sub.unsubscribe()  # before drain: see katydid.bus.nats_pull Rule 1
                    await self._nc.drain()
                except (nats.errors.Error, OSError) as exc:
                    log.warning("drain_failed", error=repr(exc))
                    await self._nc.close()
            log.info("worker_stopped", worker=self.worker_id, jobs_done=self.stats.jobs_done)

    async def _watch_signals(self) -> None:
        async def drain() -> None:
            log.info("worker_stopping", worker=self.worker_id)
            self.stop()  # the job in hand finishes; the serve loop then ends this task
            await anyio.sleep_forever()

        await until_signalled(drain, name=f"worker {self.worker_id}")

    async def _watch_parent(self, scope: anyio.CancelScope) -> None:
        """Under ``katydid serve`` (which sets KATYDID_PARENT_PID): stop when serve is gone, as
        on SIGTERM (the current job finishes; a worker still connecting gives up at once). The
        worker runs in a session of its own, so a serve killed outright (SIGKILL) would
        otherwise leave it running for good."""
        parent = os.environ.get("KATYDID_PARENT_PID", "")
        if not parent.isdigit():
            return
        while os.getppid() == int(parent):  # noqa: ASYNC110 - no event for a parent death
            await anyio.sleep(0.5)
        log.warning("worker_parent_gone", worker=self.worker_id, parent=int(parent))
        self.stop()
        if self._nc is None or not self._nc.is_connected:
            scope.cancel()  # not serving (yet, or any more): nothing to finish

    async def _heartbeat(self) -> None:
        subject = f"{WORKERS_SUBJECT}.{self.worker_id}"
        while True:
            self.stats.set_aside_now = self._order.holding()
            try:
                await self._nc.publish(subject, self.stats.to_json())
            except nats.errors.Error:
                pass  # reconnecting; the next beat will do
            self._sampled.flush()
            await anyio.sleep(self.cfg.worker_heartbeat_s)

    async def _handle(
        self, msg: Any, *, may_set_aside: bool = False, lanes: dict[str, Any] | None = None
    ) -> None:
        """One job, answered once (Rule 4); with ``lanes``, a set-aside job decoded for want of
        anything else, which gives way to a job fetched from them meanwhile (Rule 7)."""
        started = time.time()
        try:
            job = Job.from_headers(msg.headers)
        except MessageError as exc:
            self._sampled.warning("bad_job", error=str(exc))
            await msg.term()  # no reply subject to answer; never redeliver garbage
            return
        queue_s = (
            max(0.0, started - msg.metadata.timestamp.timestamp())
            if msg.metadata.timestamp
            else 0.0
        )
        bound = structlog.get_logger("katydid.worker").bind(
            job_id=job.job_id, session_id=job.session_id, seq=job.seq
        )

        def error(code: ResultError, message: str) -> JobResult:
            return answer(job, self.worker_id, queue_s, error=(code, message))

        engine: dict[str, Any] = {}  # how the engine ran it, for the log line
        if self._audience.cancelled(job.session_id):
            result = error(ResultError.CANCELLED, "the client left")
        elif time.time() * 1000 > job.deadline_unix_ms:
            result = error(ResultError.EXPIRED, "the job waited past its deadline")
        elif (orphaned := await self._audience.orphaned(job)) is not None:
            result = error(ResultError.ORPHANED, f"nobody will read it: {orphaned}")
        elif may_set_aside and (why := await self._audience.waits_for_client(job)) is not None:
            self._order.set_aside(msg, job, why)  # answered later (Rule 7)
            return
        else:
            try:
                audio = pcm16_to_float(bytes(msg.data))
            except AudioError as exc:
                result = error(ResultError.BAD_JOB, str(exc))
            else:
                decoded = await self._transcribe(job, msg, audio, queue_s, lanes)
                if decoded is None:  # it gave way: back aside, unanswered (Rule 7)
                    self._order.put_back()
                    return
                result, engine = decoded
        if result.error:
            skipped = ResultError(result.error["code"]).skipped
            self.stats.jobs_skipped += skipped
            self.stats.jobs_orphaned += result.error["code"] == ResultError.ORPHANED
            self.stats.jobs_failed += not skipped
        try:
            # Under its NATS user: the one subject its role may answer on (accounts.py).
            reply = f"{job.reply_subject}.{sender_token(self.cfg.nats_user)}"
            await self._nc.publish(reply, result.to_json())
            await msg.ack()  # after the result, on the same connection (Rule 1)
        except (nats.errors.Error, OSError) as exc:
            # Not acked: JetStream redelivers after ack_wait, the gateway ignores a duplicate.
            bound.warning("publish_failed", error=repr(exc))
            return
        bound.info(
            "job",
            outcome=result.error["code"] if result.error else "ok",
            audio_s=round(result.audio_s, 2),
            compute_s=round(result.compute_s, 3),
            queue_s=round(queue_s, 3),
            deliveries=msg.metadata.num_delivered,
            **engine,
        )

    async def _request(self, subject: str, timeout_s: float) -> Any:
        """One request on this worker's connection (the audience's record reads and asks)."""
        return await self._nc.request(subject, b"", timeout=timeout_s)

    async def _transcribe(
        self,
        job: Job,
        msg: Any,
        audio: np.ndarray,
        queue_s: float,
        lanes: dict[str, Any] | None = None,
    ) -> tuple[JobResult, dict[str, Any]] | None:
        """The engine's result as the job's answer; None when the decode stopped to give way
        to a job fetched from ``lanes`` meanwhile (Rule 7)."""
        gave_way = False

        def should_abort() -> bool:  # polled in the engine's thread
            nonlocal gave_way
            if lanes is not None and self._order.gave_way():
                gave_way = True
                return True
            return self._audience.cancelled(job.session_id)

        self.stats.busy = True
        self.stats.job_stream_seq = msg.metadata.sequence.stream
        decode = DecodeOptions(
            language=job.options.language,
            prompt=job.options.prompt,
            word_timestamps=job.options.word_timestamps,
            translate=job.options.task == "translate",
            # A partial is a preview, replaced by its final: the faster decode of a long
            # utterance (clip-sized pieces, not the full window) is worth a word heard
            # differently.
            pieces=True if job.options.kind == "partial" else None,
            preview=job.options.kind == "partial",
        )
        audio_s = audio.size / SAMPLE_RATE
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_alive, msg)
                if lanes is not None:
                    tg.start_soon(self._order.watch_lanes, lanes)
                try:
                    tr = await anyio.to_thread.run_sync(
                        lambda: self.engine.transcribe(
                            audio, decode=decode, should_abort=should_abort
                        )
                    )
                finally:
                    tg.cancel_scope.cancel()
        except KatydidError as exc:
            return answer(
                job,
                self.worker_id,
                queue_s,
                error=(ResultError.INTERNAL, str(exc)),
                audio_s=audio_s,
            ), {}
        finally:
            self.stats.busy = False
            self.stats.job_stream_seq = None
        if gave_way:
            return None
        engine = {
            "audio_ctx": tr.audio_ctx,
            "fallback": tr.fallback,
            "redecodes": tr.redecodes,
            "uncovered_s": round(sum(b - a for a, b in tr.uncovered), 2),
        }
        if self._audience.cancelled(job.session_id):
            return answer(
                job,
                self.worker_id,
                queue_s,
                error=(ResultError.CANCELLED, "the client left"),
                audio_s=tr.audio_s,
                compute_s=tr.compute_s,
            ), engine
        self.stats.jobs_done += 1
        self.stats.fallbacks = self.engine.fallbacks
        self.stats.redecodes = self.engine.redecodes
        self.stats.uncovered_s += sum(b - a for a, b in tr.uncovered)
        self.stats.audio_s += tr.audio_s
        self.stats.compute_s += tr.compute_s
        return answer(
            job,
            self.worker_id,
            queue_s,
            audio_s=tr.audio_s,
            compute_s=tr.compute_s,
            text=tr.text,
            segments=result_segments(tr, job.offset_ms / 1000.0),
            language=tr.language,
            uncovered=tuple(
                (round(a + job.offset_ms / 1000.0, 2), round(b + job.offset_ms / 1000.0, 2))
                for a, b in tr.uncovered
            ),
        ), engine

    async def _keep_alive(self, msg: Any) -> None:
        """In progress while it is decoded: at once (a job taken from the set-aside jobs had
        its last beat up to a beat ago, then its liveness checks: without one now, a loaded
        host passed ack_wait and JetStream delivered it again, decoded twice), then every
        third of ack_wait."""
        while True:
            try:
                await msg.in_progress()
            except nats.errors.Error:
                pass  # reconnecting: the next beat may still make it within ack_wait
            await anyio.sleep(max(0.5, self.cfg.consumer_ack_wait_s / 3))


def run_worker(cfg: Config, model_path: Path, worker_id: str | None = None) -> None:
    """Entry point of ``katydid worker``: load the model, then serve jobs until SIGTERM."""
    if cfg.worker_nice:
        os.nice(cfg.worker_nice)  # inference yields the CPU to the gateway (config.py)
    worker = Worker(cfg, model_path, worker_id)
    anyio.run(worker.run, backend="asyncio")
