"""The gateway's connection to NATS: nats-py on its own asyncio loop in one thread, used from
trio (``NatsBridge``, the ``JobBus`` that talks to NATS).

nats-py is asyncio-only. The gateway runs it on its own uvloop event loop in one dedicated thread
(measured 0.8–0.86× plain asyncio; trio-asyncio only 0.25–0.39×), see ARCHITECTURE.md §2.

Rule 1: nats-py objects are touched only on the asyncio thread. trio calls in through
``asyncio.run_coroutine_threadsafe`` (``NatsBridge._call``); asyncio calls back into trio only
through ``TrioToken.run_sync_soon`` with plain bytes, and the callback never raises.
Rule 2: cancellation crosses the bridge: a cancelled trio caller cancels the asyncio future.
Rule 3: library exceptions reach trio callers as ``NatsError`` (``nats_connection.translate``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import nats.errors
import structlog
import trio

from katydid.bus import BusHandlers, LaneStats
from katydid.bus.nats_connection import connect, translate
from katydid.bus.nats_sessions import TAKEOVER_SUBJECT, SessionsOnNats, ensure_resumption
from katydid.bus.nats_stream import (
    PROBE_SUBJECT,
    consumer_config,
    delete_job,
    ensure_stream,
    job_in_stream,
    lane_stats,
)
from katydid.catalog import served_name
from katydid.config import Config
from katydid.errors import JobTooLarge, NatsError, StreamFull
from katydid.log import SampledLogger
from katydid.messages import (
    CANCEL_SUBJECT,
    LANES,
    RESULTS_PREFIX,
    STREAM,
    WORKERS_SUBJECT,
    Job,
    is_model_name,
    lane_subject,
)
from katydid.session_record import gateway_ping_subject

log = structlog.get_logger("katydid.nats")
T = TypeVar("T")
MAX_PROVISIONED_MODELS = 256  # models a gateway creates consumers for (heartbeats name them)


class NatsBridge(SessionsOnNats):
    """nats-py on uvloop in a dedicated thread, used from trio.

    Args:
        cfg: configuration (URL, timeouts, stream bounds).
        gateway_id: names the results subject ``katydid.results.<gateway_id>``.

    ``attach`` says where results, heartbeats, dead jobs (JetStream's advisory after
    ``consumer_max_deliver`` deliveries) and a lost connection go, on the trio thread.
    """

    def __init__(self, cfg: Config, gateway_id: str) -> None:
        self._cfg = cfg
        self._last_retry_log = 0.0
        # nats-py reports every failed (re)connect attempt: a NATS that stays away (or refuses
        # the credentials) for hours would write a line a second.
        self._errors = SampledLogger(
            log, burst=cfg.log_sample_burst, window_s=cfg.log_sample_window_s
        )
        self.gateway_id = gateway_id
        self.results_subject = f"{RESULTS_PREFIX}.{gateway_id}"
        self._handlers = BusHandlers(
            on_result=lambda _d, _s: None,
            on_worker=lambda _: None,
            on_dead_job=lambda _s, _d: None,
            on_lost=lambda: None,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nc: Any = None
        self._js: Any = None
        self.connected = False
        self.reconnects = 0
        # nats-py reconnects by itself after a network failure, but some server errors (a
        # message over max_payload) close its connection for good: then the bridge replaces it.
        self.replacements = 0
        self.lost = False  # closed for good, not yet replaced
        self._lost = trio.Event()
        self._stopping = False
        self._generation = 0  # which connection is current (asyncio side)
        self._provisioned: set[str] = set()  # models whose consumers exist (asyncio side)
        self._provisioning: set[asyncio.Task[None]] = set()
        self.secret = b""  # the deployment's, read at connect (nats_sessions.py)
        self._followed: dict[str, Any] = {}  # session id -> its results subscription
        self._leaving = False  # draining at the end

    def attach(self, handlers: BusHandlers) -> None:
        self._handlers = handlers

    # --- trio side ---

    async def run(self, *, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the asyncio thread, connect, set up the stream; run until cancelled, then drain."""
        self._token = trio.lowlevel.current_trio_token()
        ready = threading.Event()
        thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="katydid-nats", daemon=True
        )
        thread.start()
        await trio.to_thread.run_sync(ready.wait)
        try:
            await self._call(self._connect)
            task_status.started(self)
            while True:
                await self._lost.wait()
                await self._replace()
        finally:
            self._stopping = True
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self._call(self._close)
                except NatsError as exc:
                    log.warning("nats_close_failed", error=str(exc))
            assert self._loop is not None
            asyncio.run_coroutine_threadsafe(self._stop_loop(), self._loop)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join, 5)

    async def _replace(self) -> None:
        """A new connection for one nats-py closed for good, with capped backoff, forever."""
        self._lost = trio.Event()
        self.lost = True
        log.error("nats_connection_closed", action="replacing it")
        self._handlers.on_lost()  # results published meanwhile are gone: sessions waiting must hear
        backoff = 0.5
        while True:
            try:
                await self._call(self._connect)
            except NatsError as exc:
                log.warning("nats_connect_failed", error=str(exc), retry_in_s=backoff)
                await trio.sleep(backoff)
                backoff = min(self._cfg.nats_connect_timeout_s * 3, backoff * 2)
                continue
            self.lost = False
            self.replacements += 1
            log.info("nats_connection_replaced", replacements=self.replacements)
            return

    async def _call(self, factory: Callable[[], Awaitable[T]]) -> T:
        assert self._loop is not None
        assert self._token is not None
        if self._loop.is_closed():
            raise NatsError("the NATS bridge has stopped")
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(factory(), self._loop)  # type: ignore[arg-type]
        done = trio.Event()
        token = self._token

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        fut.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            fut.cancel()
            raise
        try:
            return fut.result()
        except concurrent.futures.CancelledError as exc:
            raise NatsError("NATS call cancelled") from exc
        except NatsError:
            raise
        except Exception as exc:
            raise translate(exc) from exc

    async def publish_job(self, model: str, lane: str, job: Job, pcm: bytes) -> int:
        """Publish one chunk as a JetStream job for ``model``'s workers; returns its stream
        sequence.

        Raises:
            StreamFull: the stream is at a configured bound.
            NatsError: NATS is unreachable or timed out.
        """
        subject, headers = lane_subject(model, lane), job.headers()

        async def go() -> int:
            ack = await self._js.publish(
                subject, pcm, headers=headers, timeout=self._cfg.nats_request_timeout_s
            )
            return int(ack.seq)

        # A stream electing a new leader, or NATS reconnecting, answers nothing for seconds:
        # retried (the Nats-Msg-Id header makes a retry of a job that did land a no-op) for up
        # to publish_retry_s before the session hears 'overloaded'. A full stream or a job too
        # large is final at once.
        deadline = trio.current_time() + self._cfg.publish_retry_s
        delay = 0.25
        while True:
            try:
                return await self._call(go)
            except (StreamFull, JobTooLarge):
                raise
            except NatsError as exc:
                if trio.current_time() + delay > deadline:
                    raise
                self._sampled_retry(exc)
            await trio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def probe_store(self) -> None:
        """Whether the stream stores jobs again: a message on a subject of the stream that no
        consumer's filter takes (``PROBE_SUBJECT``), deleted at once. Once (no retries): the
        gateway asks again at its next queue poll.

        Raises:
            NatsError: it was not stored (a store with a write error answers nothing).
        """

        async def go() -> int:
            ack = await self._js.publish(
                PROBE_SUBJECT, b"", timeout=self._cfg.nats_request_timeout_s
            )
            return int(ack.seq)

        await self.delete_job(await self._call(go))

    def _sampled_retry(self, exc: NatsError) -> None:
        now = time.monotonic()
        if now - self._last_retry_log >= 1.0:  # at most one line a second, however many jobs
            self._last_retry_log = now
            log.warning("job_publish_retry", error=str(exc))

    async def delete_job(self, stream_seq: int) -> bool:
        """Remove a job from the stream: one JetStream gave up on (it would sit there unacked),
        or one of a session that ended without needing it.

        Returns:
            False when the job was already gone (a worker acked it first, or another gateway
            deleted it: every gateway deletes dead jobs).

        Raises:
            NatsError: NATS is unreachable or timed out.
        """

        return await self._call(lambda: delete_job(self._js, stream_seq))

    async def job_in_stream(self, stream_seq: int) -> bool:
        """Whether a job is still in the stream: a work queue's job leaves it when a worker
        acks it, which a worker does after publishing its result.

        Raises:
            NatsError: NATS is unreachable or timed out.
        """

        async def go() -> bool:
            return await job_in_stream(self._js, stream_seq)

        return await self._call(go)

    async def publish_cancel(self, session_id: str) -> None:
        """Tell workers to skip the queued jobs of a session whose client left."""

        async def go() -> None:
            await self._nc.publish(CANCEL_SUBJECT, session_id.encode())

        await self._call(go)

    async def lane_stats(self, models: Iterable[str]) -> dict[tuple[str, str], LaneStats]:
        """Consumer state of each model's lanes, keyed ``(model, lane)`` (one request per
        consumer, for all sessions at once); a model whose consumers do not exist yet (no worker
        of it ever started) is left out."""
        wanted = [(m, lane) for m in models for lane in LANES]

        async def go() -> dict[tuple[str, str], LaneStats]:
            return await lane_stats(self._js, wanted, self._cfg.nats_request_timeout_s)

        return await self._call(go)

    # --- asyncio side ---

    def _thread_main(self, ready: threading.Event) -> None:
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
            loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _to_trio(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._token is not None

        def guarded() -> None:
            try:
                fn(*args)
            except Exception:  # a raise inside run_sync_soon would crash the trio run
                log.exception("nats_callback_failed")

        try:
            self._token.run_sync_soon(guarded)
        except trio.RunFinishedError:
            pass

    async def _connect(self) -> None:
        async def disconnected() -> None:
            self.connected = False
            if not self._leaving:  # (our own drain at the end disconnects too: not news)
                log.warning("nats_disconnected")

        async def reconnected() -> None:
            self.connected = True
            self.reconnects += 1
            log.info("nats_reconnected")
            self._to_trio(self._handlers.on_reconnected)

        async def error(exc: Exception) -> None:
            self._errors.warning("nats_error", error=repr(exc))

        self._generation += 1
        generation = self._generation

        async def closed() -> None:
            # Only the current connection's end matters (not one a failed attempt left).
            if generation == self._generation and not self._stopping:
                self.connected = False
                self._to_trio(self._lost.set)

        async def on_result(msg: Any) -> None:
            self._to_trio(self._handlers.on_result, msg.data, msg.subject.rsplit(".", 1)[-1])

        async def on_ping(msg: Any) -> None:
            if msg.reply:
                await msg.respond(b"")

        async def on_takeover(msg: Any) -> None:
            session_id, _, owner = msg.data.decode(errors="replace").partition(" ")
            self._to_trio(self._handlers.on_takeover, session_id, owner)

        async def on_worker(msg: Any) -> None:
            self._to_trio(self._handlers.on_worker, msg.data)
            self._provision(msg.data)

        async def on_max_deliveries(msg: Any) -> None:
            try:
                advisory = json.loads(msg.data)
                stream_seq, deliveries = int(advisory["stream_seq"]), int(advisory["deliveries"])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("bad_advisory", subject=msg.subject, error=repr(exc))
                return
            self._to_trio(self._handlers.on_dead_job, stream_seq, deliveries)

        self._nc = await connect(
            self._cfg,
            f"katydid-gateway-{self.gateway_id}",
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            closed_cb=closed,
        )
        try:
            self._js = self._nc.jetstream()
            # Every configured model's consumers, so jobs wait in them before any worker of it
            # is up (workers may not create them); others' when their workers are heard.
            self._provisioned = {served_name(self._cfg.model)} | {
                served_name(m) for m, _ in self._cfg.worker_plan()
            }
            await ensure_stream(self._js, self._cfg, sorted(self._provisioned))
            self.secret = await ensure_resumption(self._js, self._cfg)
            self._followed = {}  # a new connection: sessions follow theirs again
            # <results subject>.<session>.<sender>: each worker answers under its NATS user.
            await self._nc.subscribe(f"{self.results_subject}.*.*", cb=on_result)
            await self._nc.subscribe(f"{WORKERS_SUBJECT}.>", cb=on_worker)
            await self._nc.subscribe(TAKEOVER_SUBJECT, cb=on_takeover)
            await self._nc.subscribe(gateway_ping_subject(self.gateway_id), cb=on_ping)
            # Every gateway hears every such advisory; the one whose session owns the job
            # answers.
            await self._nc.subscribe(
                f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM}.*", cb=on_max_deliveries
            )
        except BaseException:
            self._generation += 1  # this half-made connection's end is not news
            await self._nc.close()
            raise
        self.connected = True

    def _provision(self, beat: bytes) -> None:
        """The consumers of the model a heartbeat names, if not yet made (asyncio side): a
        worker may not create them. Bounded: anything on NATS may send a heartbeat."""
        try:
            model = json.loads(beat).get("model")
        except (ValueError, AttributeError):
            return  # the gateway's own handler says so (sampled)
        if not isinstance(model, str) or not is_model_name(model) or model in self._provisioned:
            return
        if len(self._provisioned) >= MAX_PROVISIONED_MODELS:
            self._errors.warning("too_many_models", model=model, bound=MAX_PROVISIONED_MODELS)
            return
        self._provisioned.add(model)
        task = asyncio.get_running_loop().create_task(self._add_consumers(model))
        self._provisioning.add(task)
        task.add_done_callback(self._provisioning.discard)

    async def _add_consumers(self, model: str) -> None:
        try:
            for lane in LANES:
                await self._js.add_consumer(STREAM, consumer_config(self._cfg, model, lane))
        except (TimeoutError, nats.errors.Error) as exc:
            self._provisioned.discard(model)  # tried again at its workers' next heartbeat
            self._errors.warning("consumers_not_created", model=model, error=repr(exc))
            return
        log.info("consumers_created", model=model)

    async def _stop_loop(self) -> None:
        # Cancel what nats-py left running (reconnect loops, subscription waiters), then stop,
        # so the loop closes with no pending task.
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    async def _close(self) -> None:
        self._leaving = True
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()
        self.connected = False
