"""The one module that talks to NATS: stream set-up, and the gateway's trio↔nats-py bridge.

nats-py is asyncio-only. The gateway runs it on its own uvloop event loop in one dedicated thread
(measured 0.8–0.86× plain asyncio; trio-asyncio only 0.25–0.39×), see ARCHITECTURE.md §2.

Rule 1: nats-py objects are touched only on the asyncio thread. trio calls in through
``asyncio.run_coroutine_threadsafe`` (``NatsBridge._call``); asyncio calls back into trio only
through ``TrioToken.run_sync_soon`` with plain bytes, and the callback never raises.
Rule 2: cancellation crosses the bridge: a cancelled trio caller cancels the asyncio future.
Rule 3: library exceptions are translated here into ``NatsError`` and its subclasses.
Rule 4: pull subscriptions are unsubscribed before ``drain()`` (a timed-out ``fetch`` makes
drain hang for its whole timeout).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import structlog
import trio
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from katydid.bus import BusHandlers, LaneStats
from katydid.catalog import served_name
from katydid.config import Config
from katydid.errors import ConfigError, JobTooLarge, NatsError, StreamFull
from katydid.log import SampledLogger
from katydid.messages import (
    CANCEL_SUBJECT,
    LANES,
    RESULTS_PREFIX,
    STREAM,
    STREAM_SUBJECTS,
    WORKERS_SUBJECT,
    Job,
    consumer_name,
    is_model_name,
    lane_subject,
)

log = structlog.get_logger("katydid.nats")
T = TypeVar("T")
# JetStream's answers to deleting a sequence it no longer stores (seen: 10043 and 10057 when a
# worker had acked the job just before; 10037 is the plain "no message found").
_GONE_CODES = (10037, 10043, 10057)


# JetStream error codes (nats-server's errors.json), matched by code, not by text: a header too
# large also says "maximum", and was once reported to clients as a full queue.
_STORE_FAILED = 10077  # JSStreamStoreFailedF: with discard=new, "maximum messages/bytes exceeded"
_STORAGE_EXHAUSTED = 10047  # JSStorageResourcesExceededErr: the server's disk allowance
_TOO_LARGE = (10054, 10097)  # JSStreamMessageExceedsMaximumErr, JSStreamHeaderExceedsMaximumErr


def translate(exc: BaseException) -> NatsError:
    """Map a nats-py exception to Katydid's error tree."""
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code in _TOO_LARGE:
            return JobTooLarge(f"job too large for the stream: {exc.description}")
        if exc.err_code in (_STORE_FAILED, _STORAGE_EXHAUSTED):
            return StreamFull(f"job stream is full: {exc.description}")
        return NatsError(f"JetStream error {exc.err_code}: {exc.description}")
    if isinstance(exc, nats.errors.MaxPayloadError):
        return JobTooLarge(f"job too large for the server: {exc!r}")
    if isinstance(exc, nats.errors.TimeoutError | asyncio.TimeoutError | TimeoutError):
        return NatsError("NATS request timed out")
    if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
        return NatsError("JetStream did not answer (no stream or server down)")
    return NatsError(f"NATS error: {exc!r}")


async def delete_job(js: Any, stream_seq: int) -> bool:
    """Delete one job from the stream; False if it was already gone (acked, or deleted by
    another gateway). Other refusals raise (a missing stream is not ours to hide)."""
    try:
        await js.delete_msg(STREAM, stream_seq)
    except nats.js.errors.APIError as exc:
        if exc.err_code in _GONE_CODES and "found" in (exc.description or "").lower():
            return False
        raise
    return True


def stream_config(cfg: Config) -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=[STREAM_SUBJECTS],  # katydid.jobs.<model>.<lane>
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_bytes=cfg.stream_max_bytes,
        max_msgs=cfg.stream_max_msgs,
        discard=DiscardPolicy.NEW,
        max_msg_size=cfg.stream_max_msg_bytes,
        duplicate_window=cfg.stream_duplicate_window_s,
        num_replicas=cfg.stream_replicas,
    )


def consumer_config(cfg: Config, model: str, lane: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=consumer_name(model, lane),
        filter_subject=lane_subject(model, lane),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=cfg.consumer_ack_wait_s,
        max_deliver=cfg.consumer_max_deliver,
        max_ack_pending=cfg.consumer_max_ack_pending,
    )


async def ensure_stream(
    js: Any, cfg: Config, models: Iterable[str] = (), *, configure: bool = True
) -> None:
    """Create or update the job stream, and the consumers of ``models`` (idempotent; asyncio
    side). Workers create their model's; the gateway its default model's, so its queue can be
    watched (and jobs wait in it) before any worker of it has started. ``configure=False`` (a
    worker): the stream's settings are the gateway's (and the worker role may not change them);
    a missing stream is created if the role allows, else waited for."""
    conf = stream_config(cfg)
    try:
        await js.stream_info(STREAM)
        if configure:
            await js.update_stream(conf)
    except nats.js.errors.NotFoundError:
        await _create_stream(js, conf, wait=not configure)
    for model in models:
        for lane in LANES:
            await js.add_consumer(STREAM, consumer_config(cfg, model, lane))


_STREAM_WAIT_S = 120.0  # a worker that may not create the stream waits this long for it


async def _create_stream(js: Any, conf: StreamConfig, *, wait: bool) -> None:
    deadline = time.monotonic() + _STREAM_WAIT_S
    while True:
        try:
            await js.add_stream(conf)
            return
        except nats.js.errors.BadRequestError:
            if not wait:  # another process created it meanwhile: ours are the settings
                await js.update_stream(conf)
            return
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if not wait:
                raise
        # Refused (no permission: the request goes unanswered): a gateway or `katydid nats
        # setup` creates it; until then, look again now and then. Bounded: the worker then
        # exits with the cause, and its supervisor (serve, systemd) starts it again.
        if time.monotonic() > deadline:
            raise NatsError(
                f"no job stream {STREAM} after {_STREAM_WAIT_S:.0f} s, and this user may not"
                " create it: start a gateway or run `katydid nats setup`"
            )
        log.warning("job_stream_missing", hint="a gateway or `katydid nats setup` creates it")
        await asyncio.sleep(5.0)
        try:
            await js.stream_info(STREAM)
            return
        except nats.js.errors.NotFoundError:
            continue


def credentials(cfg: Config) -> dict[str, Any]:
    """nats-py's connect arguments for the configured credentials and TLS trust.

    Raises:
        ConfigError: a credentials or CA file that cannot be used.
    """
    out: dict[str, Any] = {}
    if cfg.nats_user:
        out |= {"user": cfg.nats_user, "password": cfg.nats_password}
    for setting, argument in (
        ("nats_creds_file", "user_credentials"),
        ("nats_nkey_seed_file", "nkeys_seed"),
    ):
        path = getattr(cfg, setting)
        if path:
            if not Path(path).expanduser().is_file():
                raise ConfigError(f"{setting}: no such file {path}")
            out[argument] = str(Path(path).expanduser())
    if cfg.nats_tls_ca_file:
        try:
            out["tls"] = ssl.create_default_context(cafile=cfg.nats_tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"nats_tls_ca_file {cfg.nats_tls_ca_file}: {exc}") from None
    return out


def servers(url: str) -> list[str]:
    """``nats_url`` as nats-py's server list: one URL, or several (a cluster's nodes) separated
    by commas. The client also learns a cluster's other nodes from the one it reaches."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def connect(cfg: Config, name: str, *, inbox_prefix: str = "_INBOX", **callbacks: Any) -> Any:
    """Connect nats-py with Katydid's bounds: reconnect forever, bounded connect and flush.
    ``inbox_prefix``: where replies come (a worker's own, ``worker_inbox_prefix``)."""
    return await nats.connect(
        servers(cfg.nats_url),
        name=name,
        connect_timeout=cfg.nats_connect_timeout_s,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        allow_reconnect=True,
        inbox_prefix=inbox_prefix,
        **credentials(cfg),
        **callbacks,
    )


_CONSUMER_WAIT_S = 120.0  # a worker waits this long for its model's consumers
# In the job stream (katydid.jobs.>), but no model's: lane subjects are katydid.jobs.MODEL.LANE
# with MODEL a routable name, and no consumer filters on "_probe".
PROBE_SUBJECT = "katydid.jobs._probe.store"
MAX_PROVISIONED_MODELS = 256  # models a gateway creates consumers for (heartbeats name them)


async def await_consumers(js: Any, model: str) -> None:
    """Until ``model``'s consumers exist (asyncio side). A worker may not create them (it could
    also change them: ``katydid.bus.accounts``): a gateway creates a model's when it hears the
    first heartbeat of a worker of it, and every configured model's at start; so does
    ``katydid --model M nats setup``. Bounded: the worker then exits with the cause, and its
    supervisor (serve, systemd) starts it again.

    Raises:
        NatsError: still missing after ``_CONSUMER_WAIT_S``.
    """
    deadline = time.monotonic() + _CONSUMER_WAIT_S
    waited = False
    while True:
        missing = []
        for lane in LANES:
            try:
                await js.consumer_info(STREAM, consumer_name(model, lane))
            except nats.js.errors.NotFoundError:
                missing.append(consumer_name(model, lane))
        if not missing:
            if waited:
                log.info("consumers_found", model=model)
            return
        if time.monotonic() > deadline:
            raise NatsError(
                f"no consumers {', '.join(missing)} after {_CONSUMER_WAIT_S:.0f} s, and a"
                " worker may not create them: a gateway on this NATS creates them when it hears"
                f" this worker, or run `katydid --model {model} nats setup` as admin"
            )
        if not waited:
            log.warning("waiting_for_consumers", model=model, consumers=missing)
            waited = True
        await asyncio.sleep(0.5)


class PullLane:
    """One lane's durable pull consumer, as a worker takes its jobs one at a time (asyncio).

    ``take_now`` asks with ``no_wait``: JetStream answers at once, a job or "none", so probing an
    empty lane costs one round trip. (A lingering fetch waits out its whole timeout: probing
    the empty interactive lane before each bulk job left a worker idle 0.5 s per job when
    only uploads were queued.) ``take_within`` lingers, for a worker with nothing to do.
    The answers come to an inbox of the lane's own: a pulled job keeps its stream subject, so
    nats-py's ``request`` (which routes replies by subject) never sees it.
    """

    _NO_WAIT = b'{"batch":1,"no_wait":true}'

    def __init__(
        self,
        nc: Any,
        sub: Any,
        durable: str,
        request_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nc = nc
        self._clock = clock
        self._sub = sub  # the bound pull subscription: take_within's lingering fetch
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{durable}"
        self._timeout_s = request_timeout_s
        self._answers: asyncio.Queue[Any] = asyncio.Queue()
        self._inbox: Any = None
        self._asked_at: float | None = None  # the request still unanswered, if any

    async def take_now(self) -> Any | None:
        """The lane's next job if one is queued now, else None (also when JetStream did not
        answer in time: its late answer, a job or "none", is taken by the next call).

        One request is out at a time: during a NATS outage unanswered requests would queue up
        in nats-py and, flushed on reconnect, pull that many jobs to this one worker at once.
        A request unanswered for three timeouts is taken as lost and asked again."""
        if self._inbox is None:
            self._inbox = await self._nc.subscribe(self._nc.new_inbox(), cb=self._answers.put)
        while not self._answers.empty():  # a late answer to an earlier request
            self._asked_at = None
            msg = self._answers.get_nowait()
            if not _is_status(msg):
                return msg
        now = self._clock()
        if self._asked_at is None or now - self._asked_at > 3 * self._timeout_s:
            await self._nc.publish(self._next, self._NO_WAIT, reply=self._inbox.subject)
            self._asked_at = now
        try:
            msg = await asyncio.wait_for(self._answers.get(), self._timeout_s)
        except TimeoutError:
            return None
        self._asked_at = None
        return None if _is_status(msg) else msg

    async def take_within(self, timeout_s: float) -> Any | None:
        """The lane's next job, waiting for one up to ``timeout_s``."""
        try:
            msgs = await self._sub.fetch(1, timeout=timeout_s)
        except nats.errors.TimeoutError:
            return None
        return msgs[0] if msgs else None

    async def unsubscribe(self) -> None:
        await self._sub.unsubscribe()
        if self._inbox is not None:
            await self._inbox.unsubscribe()


def _is_status(msg: Any) -> bool:
    """JetStream's word instead of a job: 404 no messages, 408 request expired, 409 ..."""
    return bool(msg.headers and msg.headers.get("Status"))


def set_up_stream(cfg: Config) -> str:
    """Create the job stream and the default model's consumers (``katydid nats setup``);
    returns what is in place, in words (blocking; runs its own loop).

    Raises:
        NatsError: NATS is unreachable or refused.
    """
    model = served_name(cfg.model)

    async def go() -> None:
        nc = await connect(cfg, "katydid-setup")
        try:
            await ensure_stream(nc.jetstream(), cfg, [model])
        finally:
            await nc.drain()

    try:
        asyncio.run(go())
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise translate(exc) from exc
    names = ", ".join(consumer_name(model, lane) for lane in LANES)
    return f"stream {STREAM} and consumers {names} (model {model}) are in place"


def queue_status(cfg: Config) -> dict[str, Any]:
    """The job stream's state, each consumer's, and the workers heard from within two heartbeat
    intervals (``katydid nats status``; blocking, runs its own loop).

    Raises:
        NatsError: NATS is unreachable, or there is no job stream.
    """
    listen_s = 2.0 * cfg.worker_heartbeat_s + 0.5

    refused: list[str] = []

    async def quiet(exc: Exception) -> None:
        # The one failure that matters is raised below, in words; a refused probe is noted.
        if "permissions violation" in str(exc).lower():
            refused.append(str(exc))

    async def go() -> dict[str, Any]:
        # One attempt: an operator's command must fail at once, not reconnect forever.
        try:
            nc = await asyncio.wait_for(
                nats.connect(
                    servers(cfg.nats_url),
                    name="katydid-status",
                    connect_timeout=cfg.nats_connect_timeout_s,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    error_cb=quiet,
                    **credentials(cfg),
                ),
                cfg.nats_connect_timeout_s,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            # nats-py gives up on a refused or unknown address by timing out: "TimeoutError()".
            why = (
                f"no connection within {cfg.nats_connect_timeout_s:g} s (is nats-server running"
                " there, and is the URL nats://HOST:PORT?)"
                if isinstance(exc, TimeoutError)
                else repr(exc)
            )
            raise NatsError(f"cannot reach NATS at {cfg.nats_url}: {why}") from exc
        beats: dict[str, dict[str, Any]] = {}

        async def on_beat(msg: Any) -> None:
            try:
                beat = json.loads(msg.data)
                beats[str(beat["id"])] = beat
            except (ValueError, KeyError, TypeError):
                pass  # not a heartbeat: not ours to report

        try:
            await nc.subscribe(f"{WORKERS_SUBJECT}.>", cb=on_beat)
            js = nc.jetstream()
            info = await js.stream_info(STREAM)
            consumers = []
            for c in await js.consumers_info(STREAM):
                subject = c.config.filter_subject or ""
                parts = subject.split(".")
                consumers.append(
                    {
                        "name": c.name,
                        "model": parts[2] if len(parts) == 4 else "",
                        "lane": parts[3] if len(parts) == 4 else "",
                        "pending": int(c.num_pending or 0),
                        "ack_pending": int(c.num_ack_pending or 0),
                        "redelivered": int(c.num_redelivered or 0),
                    }
                )
            stores = await _probe_stream(js, cfg.nats_request_timeout_s)
            await asyncio.sleep(listen_s)
        finally:
            await nc.close()
        if refused:
            stores = {"stores_jobs": None, "why": "not checked: this user may not publish jobs"}
        return {
            "stream": stores
            | {
                "name": STREAM,
                "messages": int(info.state.messages),
                "bytes": int(info.state.bytes),
                "max_msgs": int(info.config.max_msgs or -1),
                "max_bytes": int(info.config.max_bytes or -1),
                "max_msg_size": int(info.config.max_msg_size or -1),
            },
            "consumers": sorted(consumers, key=lambda c: c["name"]),
            "workers": [
                {
                    "id": worker,
                    "model": str(b.get("model", "")),
                    "busy": bool(b.get("busy")),
                    "jobs_done": int(b.get("jobs_done") or 0),
                    "rtf": b.get("rtf"),
                }
                for worker, b in sorted(beats.items())
            ],
            "listened_s": listen_s,
        }

    try:
        return asyncio.run(go())
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
        raise translate(exc) from exc


async def _probe_stream(js: Any, timeout_s: float) -> dict[str, Any]:
    """Whether the stream stores a job now: a message no consumer takes, deleted at once. A
    store with a write error (a full disk) answers every API call but stores nothing."""
    try:
        ack = await js.publish(PROBE_SUBJECT, b"", timeout=timeout_s)
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        why = (
            f"it stored no test message within {timeout_s:g} s: its store cannot write (a full"
            " disk? see nats-server's log); sessions are refused 'overloaded' meanwhile"
        )
        return {"stores_jobs": False, "why": why}
    except nats.js.errors.APIError as exc:
        return {"stores_jobs": False, "why": f"it refused a test message: {exc.description}"}
    with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
        await js.delete_msg(STREAM, ack.seq)
    return {"stores_jobs": True, "why": ""}


def purge_jobs(cfg: Config) -> int:
    """Drop every job in the stream; returns how many there were (blocking; runs its own loop).

    For ``katydid serve``'s embedded NATS only: whatever its store holds at start was queued by a
    gateway that no longer exists, so transcribing it would only delay new clients.

    Raises:
        NatsError: NATS is unreachable or refused.
    """

    async def go() -> int:
        nc = await connect(cfg, "katydid-serve")
        try:
            js = nc.jetstream()
            try:
                stale = int((await js.stream_info(STREAM)).state.messages)
            except nats.js.errors.NotFoundError:
                return 0
            if stale:
                await js.purge_stream(STREAM)
            return stale
        finally:
            await nc.close()

    try:
        return asyncio.run(go())
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise translate(exc) from exc


class NatsBridge:
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
            try:
                await self._js.get_msg(STREAM, stream_seq)
            except nats.js.errors.NotFoundError:
                return False
            except nats.js.errors.APIError as exc:
                if exc.err_code in _GONE_CODES:
                    return False
                raise
            return True

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
            out = {}
            for model, lane in wanted:
                try:
                    info = await self._js.consumer_info(
                        STREAM, consumer_name(model, lane), timeout=self._cfg.nats_request_timeout_s
                    )
                except nats.js.errors.NotFoundError:
                    continue
                out[model, lane] = LaneStats(
                    pending=int(info.num_pending or 0),
                    in_progress=int(info.num_ack_pending or 0),
                    delivered_stream_seq=int(info.delivered.stream_seq if info.delivered else 0),
                    redelivered=int(info.num_redelivered or 0),
                )
            return out

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
            # <results subject>.<sender>: each worker answers under its NATS user.
            await self._nc.subscribe(f"{self.results_subject}.*", cb=on_result)
            await self._nc.subscribe(f"{WORKERS_SUBJECT}.>", cb=on_worker)
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
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()
        self.connected = False
