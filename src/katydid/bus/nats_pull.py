"""A worker's pull lane: one lane's durable consumer, its jobs taken one at a time (asyncio).

Rule 1: pull subscriptions are unsubscribed (``PullLane.unsubscribe``) before ``drain()``: a
timed-out ``fetch`` makes drain hang for its whole timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import nats.errors

from katydid.messages import STREAM


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
