"""The worker process: pull one job, transcribe it, publish the result, then ack.

anyio on the asyncio backend with nats-py (no trio here). One process holds one model.

Rule 1: a job is acked only after its result is published, on the same connection: NATS
processes a connection's messages in order, so the ack never takes effect before the result is
routed, and a crash before either means redelivery, never loss. No flush between them: it cost
a round trip per job while the worker sat idle (the next fetch's round trip sends both anyway).
Rule 2: the interactive lane is tried first, so a 3 s clip never waits behind a long file; every
``bulk_every``-th job comes from bulk when it has any, so uploads are never starved.
Rule 3: while whisper.cpp runs in a thread, the event loop keeps the job alive with
``in_progress()`` and watches for the session's cancellation (whisper.cpp's abort callback).
Rule 4: every job ends in exactly one result: final, or an error (``cancelled``, ``expired``,
``orphaned``, ``bad_job``, ``internal``). Deliveries are bounded by the consumer's max_deliver.
Rule 5: SIGTERM/SIGINT: finish the current job, stop fetching, nak the jobs set aside (no
delay: another worker takes them), unsubscribe, drain, exit.
Rule 6: before engine time, the session's record is read (``liveness.py``): a job whose session
has none is ``orphaned``; one whose check could not be made is transcribed.
Rule 7: a job whose session waits for its client (record ``detached``, or its gateway not heard
on ``katydid.gateways.*``) is set aside, unanswered (``set_aside.py``), while other jobs are
decoded. The next job is: a set-aside one whose session is live again (or ended, cancelled,
expired: answered as any job); else the oldest set-aside one past the bound; else a fetched
one; else, with every lane empty, the oldest set-aside one (a worker never idles holding work).
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict, deque
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
from katydid.session_record import GATEWAYS_SUBJECT, gateway_ping_subject
from katydid_worker.engine import Engine
from katydid_worker.engine_build import build_info, has_fast_kernels
from katydid_worker.engine_options import DecodeOptions, EngineOptions
from katydid_worker.job_result import answer, result_segments
from katydid_worker.liveness import Liveness, SessionLiveness
from katydid_worker.set_aside import Aside, Gateways, SetAside, keep_alive, waiting_why
from katydid_worker.worker_stats import WorkerStats

log = structlog.get_logger("katydid.worker")
ASK_TIMEOUT_S = 0.25  # a gateway asked whether it is there: no answer by then tells nothing
_FETCH_INTERACTIVE_S = 0.5  # the wait for a job when both lanes are empty
_CANCELLED_MAX = 10_000  # sessions remembered as cancelled (oldest forgotten first)
_LIVENESS_TIMEOUT_S = 1.0  # the most a record read may add to a job (it is ~0.3 ms when well)
_REVIEW_BUDGET_S = 0.1  # time for one pass over set-aside jobs before the next fetch


def lane_order(interactive_streak: int, bulk_every: int) -> tuple[str, str]:
    """Which lane a worker tries first: interactive (a 3 s clip never waits behind a long file),
    except that after ``bulk_every - 1`` interactive jobs in a row the next try is bulk, so a
    steady stream of live sessions cannot starve uploads (0: strict priority)."""
    if bulk_every > 0 and interactive_streak >= bulk_every - 1:
        return ("bulk", "interactive")
    return ("interactive", "bulk")


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
            ),
        )
        self.model = served_name(cfg.model)  # the jobs it takes are routed by this name
        self.stats = WorkerStats(self.worker_id, self.model, self.engine.multilingual)
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._interactive_streak = 0  # interactive jobs taken since the last bulk one
        self._stopping = anyio.Event()
        self._nc: Any = None
        self._liveness = SessionLiveness(
            self._request,
            min(cfg.nats_request_timeout_s, _LIVENESS_TIMEOUT_S),
            window_s=cfg.resume_window_s,
        )
        self._bucket_absent = False  # said once, not per job: a deployment without resumption
        self._gateways = Gateways(cfg.gateway_heartbeat_s)
        # Each set-aside job is one of its consumer's max_ack_pending: half of it at most, so
        # other workers still get jobs.
        self._aside = SetAside(
            cfg.worker_set_aside_bytes, max(1, cfg.consumer_max_ack_pending // 2)
        )
        self._released: deque[Aside] = deque()  # out of the set, decoded before any fetch
        self._aside_open = False  # logged once per transition, not per job
        # Garbage on the job subject is taken and dropped as fast as it arrives: sampled.
        self._sampled = SampledLogger(
            log, burst=cfg.log_sample_burst, window_s=cfg.log_sample_window_s
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
        async def error(exc: Exception) -> None:
            self._sampled.warning("nats_error", worker=self.worker_id, error=repr(exc))

        async def disconnected() -> None:
            self._sampled.warning("nats_disconnected", worker=self.worker_id)

        async def reconnected() -> None:
            log.info("nats_reconnected", worker=self.worker_id)
            self._gateways.listening()  # beats were missed meanwhile: not silent gateways

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
        await self._nc.subscribe(CANCEL_SUBJECT, cb=self._on_cancel)
        await self._nc.subscribe(f"{GATEWAYS_SUBJECT}.*", cb=self._on_gateway)
        self._gateways.listening()
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
                tg.start_soon(keep_alive, self._held, max(0.5, self.cfg.consumer_ack_wait_s / 3))
                while not self._stopping.is_set():
                    msg, fresh = await self._next_job(subs)
                    if msg is not None:
                        with anyio.CancelScope(shield=True):  # a started job always finishes
                            await self._handle(msg, may_set_aside=fresh)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                try:
                    await self._give_back_aside()
                    for sub in subs.values():
                        await sub.unsubscribe()  # before drain: see katydid.bus.nats_pull Rule 1
                    await self._nc.drain()
                except (nats.errors.Error, OSError) as exc:
                    log.warning("drain_failed", error=repr(exc))
                    await self._nc.close()
            log.info("worker_stopped", worker=self.worker_id, jobs_done=self.stats.jobs_done)

    async def _next_job(self, lanes: dict[str, Any]) -> tuple[Any, bool]:
        """The next job (Rule 7), and whether it is fresh from a lane (it may be set aside)."""
        if not self._released:
            due = self._aside.due()
            # Each check is a read when its session's verdict is older than a second: with NATS
            # slow (a read may take its whole timeout) the pass stops, the rest go next time.
            budget = time.monotonic() + _REVIEW_BUDGET_S
            for i, entry in enumerate(due):
                if time.monotonic() > budget:
                    self._aside.look_again(due[i:])
                    break
                if not await self._still_waiting(entry):
                    self._aside.release(entry)
                    self._released.append(entry)
        if self._released:
            return self._released.popleft().msg, False
        if self._aside_open and not self._aside:
            log.info("set_aside_empty", worker=self.worker_id)
            self._aside_open = False
        if self._aside.over():
            return self._take_oldest("bound"), False
        msg = await self._next(lanes, linger=not self._aside)
        if msg is None and self._aside and not self._stopping.is_set():
            return self._take_oldest("idle"), False
        return msg, True

    def _held(self) -> list[Any]:
        """The jobs set aside or released from it, not yet answered: kept in progress (a
        burst of resumed sessions' jobs may take longer than ack_wait to decode)."""
        return [*(e.msg for e in self._released), *self._aside.messages()]

    async def _still_waiting(self, entry: Aside) -> bool:
        """Whether a set-aside job still waits for its client (cached checks: ``liveness``)."""
        if entry.session_id in self._cancelled or time.time() * 1000 > entry.deadline_unix_ms:
            return False  # answered now: cancelled / expired
        check = await self._liveness.check(entry.session_id)
        await self._ask_gateway(check.gateway)
        return waiting_why(check, self._gateways) is not None

    def _take_oldest(self, why: str) -> Any:
        entry = self._aside.oldest()
        assert entry is not None  # the caller saw the set non-empty
        self._sampled.info(
            "set_aside_decoded",
            worker=self.worker_id,
            session_id=entry.session_id,
            why=why,
            aside_s=round(time.monotonic() - entry.since, 2),
            set_aside_now=len(self._aside),
        )
        return entry.msg

    def _set_aside(self, msg: Any, job: Job, why: str) -> None:
        if not self._aside_open:
            log.info("set_aside_started", worker=self.worker_id, why=why)
            self._aside_open = True
        if not self._aside.holds(job.session_id):  # a session's transition, not each job
            self._sampled.info(
                "session_set_aside", worker=self.worker_id, session_id=job.session_id, why=why
            )
        self._aside.add(msg, job.session_id, job.deadline_unix_ms)
        self.stats.jobs_set_aside += 1

    async def _give_back_aside(self) -> None:
        """Stopping: every job held aside back to the stream at once (Rule 5)."""
        held = [*self._released, *self._aside.take_all()]
        self._released.clear()
        for entry in held:
            try:
                await entry.msg.nak()  # no delay: another worker takes it now
            except (nats.errors.Error, OSError):
                pass  # redelivered after ack_wait anyway
        if held:
            log.info("set_aside_returned", worker=self.worker_id, jobs=len(held))

    async def _on_gateway(self, msg: Any) -> None:
        self._gateways.heard(msg.subject.rsplit(".", 1)[-1])

    async def _next(self, lanes: dict[str, Any], *, linger: bool = True) -> Any:
        """The next job: each lane asked in ``lane_order`` for one queued now; with both empty,
        a wait on the interactive lane (a live utterance is taken the moment it comes; bulk is
        asked again after it), unless not ``linger`` (jobs are set aside: decode one)."""
        try:
            for lane in lane_order(self._interactive_streak, self.cfg.bulk_every):
                msg = await lanes[lane].take_now()
                if msg is not None:
                    self._interactive_streak = (
                        self._interactive_streak + 1 if lane == "interactive" else 0
                    )
                    return msg
                if lane == "bulk":
                    # Bulk's turn came and it had nothing: its next turn is bulk_every jobs
                    # away, not before every job.
                    self._interactive_streak = 0
            if not linger:
                return None
            msg = await lanes["interactive"].take_within(_FETCH_INTERACTIVE_S)
        except (nats.errors.Error, OSError) as exc:
            self._sampled.warning("fetch_failed", error=repr(exc))
            await anyio.sleep(1.0)  # NATS reconnecting; bounded pace, no spin
            return None
        if msg is not None:
            self._interactive_streak += 1
        return msg

    async def _on_cancel(self, msg: Any) -> None:
        self._cancelled[msg.data.decode(errors="replace")] = None
        while len(self._cancelled) > _CANCELLED_MAX:
            self._cancelled.popitem(last=False)

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
            self.stats.set_aside_now = len(self._aside) + len(self._released)
            try:
                await self._nc.publish(subject, self.stats.to_json())
            except nats.errors.Error:
                pass  # reconnecting; the next beat will do
            self._sampled.flush()
            await anyio.sleep(self.cfg.worker_heartbeat_s)

    async def _handle(self, msg: Any, *, may_set_aside: bool = False) -> None:
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
        if job.session_id in self._cancelled:
            result = error(ResultError.CANCELLED, "the client left")
        elif time.time() * 1000 > job.deadline_unix_ms:
            result = error(ResultError.EXPIRED, "the job waited past its deadline")
        elif (orphaned := await self._orphaned(job)) is not None:
            result = error(ResultError.ORPHANED, f"nobody will read it: {orphaned}")
        elif may_set_aside and (why := await self._waits_for_client(job)) is not None:
            self._set_aside(msg, job, why)  # answered later (Rule 7)
            return
        else:
            try:
                audio = pcm16_to_float(bytes(msg.data))
            except AudioError as exc:
                result = error(ResultError.BAD_JOB, str(exc))
            else:
                result, engine = await self._transcribe(job, msg, audio, queue_s)
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
        return await self._nc.request(subject, b"", timeout=timeout_s)

    async def _orphaned(self, job: Job) -> str | None:
        """Why nobody will read the job's result (the session's record is gone), or None: it
        has one, or the check could not be made (Rule 6)."""
        check = await self._liveness.check(job.session_id)
        if check.liveness == Liveness.NO_BUCKET:
            # A deployment without resumption (or a bucket without direct gets): said once.
            if not self._bucket_absent:
                log.info("sessions_unchecked", worker=self.worker_id, why=check.why)
            self._bucket_absent = True
            return None
        self._bucket_absent = False
        if check.liveness == Liveness.UNCHECKED:
            if not check.cached:
                self._sampled.warning(
                    "session_check_failed", session_id=job.session_id, error=check.why
                )
            return None
        return check.why if check.liveness == Liveness.ORPHANED else None

    async def _waits_for_client(self, job: Job) -> str | None:
        """Why the job's session waits for its client (Rule 7), or None. The check was just
        made by ``_orphaned``: this one is its cached verdict."""
        if self.cfg.worker_set_aside_bytes <= 0:
            return None  # setting aside is off
        check = await self._liveness.check(job.session_id)
        await self._ask_gateway(check.gateway)
        return waiting_why(check, self._gateways)

    async def _ask_gateway(self, gateway_id: str) -> None:
        """Whether the gateway of a job's session is there, if not heard for a beat: NATS says
        "no responders" the instant its connection is gone (set_aside.py Rule 1)."""
        if not self._gateways.should_ask(gateway_id):
            return
        try:
            await self._nc.request(gateway_ping_subject(gateway_id), b"", timeout=ASK_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            self._gateways.gone(gateway_id)
            return
        except (nats.errors.Error, OSError, TimeoutError):
            return  # busy or unreachable: the heartbeats tell
        self._gateways.heard(gateway_id)

    async def _transcribe(
        self, job: Job, msg: Any, audio: np.ndarray, queue_s: float
    ) -> tuple[JobResult, dict[str, Any]]:
        self.stats.busy = True
        self.stats.job_stream_seq = msg.metadata.sequence.stream
        decode = DecodeOptions(
            language=job.options.language,
            prompt=job.options.prompt,
            word_timestamps=job.options.word_timestamps,
            translate=job.options.task == "translate",
        )
        audio_s = audio.size / SAMPLE_RATE
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_alive, msg)
                try:
                    tr = await anyio.to_thread.run_sync(
                        lambda: self.engine.transcribe(
                            audio,
                            decode=decode,
                            should_abort=lambda: job.session_id in self._cancelled,
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
        engine = {
            "audio_ctx": tr.audio_ctx,
            "fallback": tr.fallback,
            "redecodes": tr.redecodes,
            "uncovered_s": round(sum(b - a for a, b in tr.uncovered), 2),
        }
        if job.session_id in self._cancelled:
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
        while True:
            await anyio.sleep(max(0.5, self.cfg.consumer_ack_wait_s / 3))
            try:
                await msg.in_progress()
            except nats.errors.Error:
                pass  # reconnecting: the next beat may still make it within ack_wait


def run_worker(cfg: Config, model_path: Path, worker_id: str | None = None) -> None:
    """Entry point of ``katydid worker``: load the model, then serve jobs until SIGTERM."""
    if cfg.worker_nice:
        os.nice(cfg.worker_nice)  # inference yields the CPU to the gateway (config.py)
    worker = Worker(cfg, model_path, worker_id)
    anyio.run(worker.run, backend="asyncio")
