"""The job stream and its consumers: their settings, creating them, waiting for them, reading
their state, and deleting one job (asyncio side: workers, ``katydid nats setup``, the gateway's
bridge)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from katydid.bus import LaneStats
from katydid.config import Config
from katydid.errors import NatsError
from katydid.messages import LANES, STREAM, STREAM_SUBJECTS, consumer_name, lane_subject

log = structlog.get_logger("katydid.nats")
# JetStream's answers to deleting a sequence it no longer stores (seen: 10043 and 10057 when a
# worker had acked the job just before; 10037 is the plain "no message found").
_GONE_CODES = (10037, 10043, 10057)

_CONSUMER_WAIT_S = 120.0  # a worker waits this long for its model's consumers
# In the job stream (katydid.jobs.>), but no model's: lane subjects are katydid.jobs.MODEL.LANE
# with MODEL a routable name, and no consumer filters on "_probe".
PROBE_SUBJECT = "katydid.jobs._probe.store"


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


async def job_in_stream(js: Any, stream_seq: int) -> bool:
    """Whether a job is still in the stream (asyncio side of ``NatsBridge.job_in_stream``)."""
    try:
        await js.get_msg(STREAM, stream_seq)
    except nats.js.errors.NotFoundError:
        return False
    except nats.js.errors.APIError as exc:
        if exc.err_code in _GONE_CODES:
            return False
        raise
    return True


async def lane_stats(
    js: Any, wanted: Iterable[tuple[str, str]], timeout_s: float
) -> dict[tuple[str, str], LaneStats]:
    """Consumer state of each ``(model, lane)`` in ``wanted`` whose consumer exists (asyncio side
    of ``NatsBridge.lane_stats``)."""
    out = {}
    for model, lane in wanted:
        try:
            info = await js.consumer_info(STREAM, consumer_name(model, lane), timeout=timeout_s)
        except nats.js.errors.NotFoundError:
            continue
        out[model, lane] = LaneStats(
            pending=int(info.num_pending or 0),
            in_progress=int(info.num_ack_pending or 0),
            delivered_stream_seq=int(info.delivered.stream_seq if info.delivered else 0),
            redelivered=int(info.num_redelivered or 0),
        )
    return out


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
