"""What outlives a session's connection, on NATS: the session records (KV ``KATYDID_SESSIONS``),
the results stream (``KATYDID_RESULTS``), the deployment's shared secret (KV
``KATYDID_GATEWAYS``: every gateway signs job and resume tokens with it, so any gateway can take
a session over), and the takeover announcements between gateways.

``SessionsOnNats`` is the trio side, a part of ``NatsBridge`` (it uses the bridge's asyncio
thread through ``_call``); the functions below it are the asyncio side.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.js.api import (
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from katydid.bus import BusHandlers
from katydid.config import Config
from katydid.errors import MessageError
from katydid.messages import RESULTS_PREFIX
from katydid.session_record import (
    GATEWAYS_BUCKET,
    GATEWAYS_BYTES,
    GATEWAYS_SUBJECT,
    RESULTS_STREAM,
    SESSIONS_BUCKET,
    SessionRecord,
    results_filter,
)

log = structlog.get_logger("katydid.nats")
T = TypeVar("T")

SECRET_KEY = "token_secret"
TAKEOVER_SUBJECT = "katydid.sessions.takeover"  # body: "<session id> <owner>"


class SessionsOnNats:
    """Session records, results replay and takeovers (trio side; a part of ``NatsBridge``)."""

    _cfg: Config
    _js: Any
    _nc: Any
    _handlers: BusHandlers
    secret: bytes
    _call: Callable[..., Awaitable[Any]]
    _followed: dict[str, Any]
    _to_trio: Callable[..., None]

    async def put_record(self, record: SessionRecord, *, last: int | None = None) -> int | None:
        """Write a session's record; its new revision. ``last``: only over that revision (the
        one this connection wrote last), else None: another connection wrote it since (it took
        the session over), or it is gone."""

        async def go() -> int | None:
            kv = await self._js.key_value(SESSIONS_BUCKET)
            if last is None:
                return int(await kv.put(record.session_id, record.to_json()))
            try:
                return int(await kv.update(record.session_id, record.to_json(), last=last))
            except nats.js.errors.KeyWrongLastSequenceError:
                return None

        revision: int | None = await self._call(go)
        return revision

    async def delete_record(self, session_id: str, *, last: int | None = None) -> None:
        """The session ended for good (``last``: only if still at that revision, ours)."""

        async def go() -> None:
            kv = await self._js.key_value(SESSIONS_BUCKET)
            try:
                await kv.delete(session_id, last=last)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # another connection has it now: not ours to end

        await self._call(go)

    async def get_record(self, session_id: str) -> tuple[SessionRecord, int] | None:
        """The session's record and its revision, None if there is none (ended, or past its
        window)."""

        async def go() -> tuple[SessionRecord, int] | None:
            kv = await self._js.key_value(SESSIONS_BUCKET)
            try:
                entry = await kv.get(session_id)
            except nats.js.errors.KeyNotFoundError:
                return None
            try:
                return SessionRecord.from_json(entry.value or b""), int(entry.revision)
            except MessageError as exc:
                log.warning("bad_session_record", session_id=session_id, error=str(exc))
                return None

        result: tuple[SessionRecord, int] | None = await self._call(go)
        return result

    async def follow_results(self, session_id: str) -> None:
        """Every result of the session in the results stream, from the first, and those to come
        (whichever gateway published their jobs), to ``on_replayed`` until ``unfollow``."""

        async def go() -> None:
            async def cb(msg: Any) -> None:
                sender = msg.subject.rsplit(".", 1)[-1]
                self._to_trio(self._handlers.on_replayed, msg.data, sender)

            # Followed already (a connection that resumes it again before the last one's
            # end was carried out): that consumer goes, or every quick resume leaks one and
            # the stream's consumer limit ends every resume after it.
            await self._drop_follow(session_id)
            sub = await self._js.subscribe(
                results_filter(session_id),
                stream=RESULTS_STREAM,
                cb=cb,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
            )
            self._followed[session_id] = sub

        await self._call(go)

    async def unfollow_results(self, session_id: str) -> None:
        await self._call(lambda: self._drop_follow(session_id))

    async def _drop_follow(self, session_id: str) -> None:
        """(On the bus's loop.)"""
        sub = self._followed.pop(session_id, None)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass  # its connection is gone: so is the consumer, with its inactivity

    async def gateway_alive(self, gateway_id: str) -> None:
        """This gateway is alive (workers set aside the jobs of a gateway not heard)."""

        async def go() -> None:
            await self._nc.publish(f"{GATEWAYS_SUBJECT}.{gateway_id}", gateway_id.encode())

        await self._call(go)

    async def announce_takeover(self, session_id: str, owner: str) -> None:
        async def go() -> None:
            await self._nc.publish(TAKEOVER_SUBJECT, f"{session_id} {owner}".encode())

        await self._call(go)


# --- asyncio side ---


async def ensure_resumption(js: Any, cfg: Config) -> bytes:
    """The results stream and the buckets (idempotent), and the deployment's secret: made by
    the first gateway, read by the others."""
    if cfg.resume_window_s > 0:
        await _ensure_records(js, cfg)
    return await _shared_secret(js, cfg)


async def _ensure_records(js: Any, cfg: Config) -> None:
    """The results stream and the sessions bucket (only with resumption on: their ages are
    the window)."""
    results = StreamConfig(
        name=RESULTS_STREAM,
        subjects=[f"{RESULTS_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=cfg.resume_window_s,
        max_bytes=cfg.results_max_bytes,
        max_consumers=cfg.results_max_consumers,
        discard=DiscardPolicy.OLD,
        num_replicas=cfg.stream_replicas,
    )
    try:
        await js.stream_info(RESULTS_STREAM)
        await js.update_stream(results)
    except nats.js.errors.NotFoundError:
        await js.add_stream(results)
    await _ensure_bucket(js, cfg, SESSIONS_BUCKET, cfg.resume_window_s, cfg.sessions_max_bytes)


async def _ensure_bucket(
    js: Any, cfg: Config, bucket: str, ttl: float | None, max_bytes: int
) -> None:
    conf = KeyValueConfig(
        bucket=bucket,
        history=1,
        ttl=ttl,
        direct=True,  # workers read a record by a direct get of its key, nothing more
        replicas=cfg.stream_replicas,
        max_bytes=max_bytes,
    )
    try:
        await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        try:
            await js.create_key_value(conf)
        except nats.js.errors.BadRequestError:
            pass  # another gateway made it meanwhile


async def _shared_secret(js: Any, cfg: Config) -> bytes:
    """The deployment's secret (job tokens, resume tokens): made by the first gateway."""
    await _ensure_bucket(js, cfg, GATEWAYS_BUCKET, None, GATEWAYS_BYTES)
    kv = await js.key_value(GATEWAYS_BUCKET)
    try:
        await kv.create(SECRET_KEY, secrets.token_bytes(32))
    except nats.js.errors.KeyWrongLastSequenceError:
        pass  # another gateway made it first: theirs is the deployment's
    entry = await kv.get(SECRET_KEY)
    secret: bytes = entry.value or b""
    if len(secret) < 16:
        raise MessageError(f"{GATEWAYS_BUCKET}.{SECRET_KEY} holds no usable secret")
    return secret
