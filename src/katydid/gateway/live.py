"""A session being served (``Live``): the sans-IO core, what the bus reported to it and its
door has not applied yet, and what the gateway keeps about it (its key, its log line).

Bus callbacks run on the trio thread and never block or raise: they hand inputs to a session's
inbox (``Live.deliver``, bounded), which its door's driver applies in order (``apply``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from katydid.gateway.outputs import Output
from katydid.gateway.session import Session
from katydid.gateway.tenants import Tenant
from katydid.gateway.window import Hold
from katydid.messages import JobResult


@dataclass(frozen=True, slots=True)
class DeadJob:
    stream_seq: int
    deliveries: int


@dataclass(frozen=True, slots=True)
class QueueLost:
    pass


@dataclass(frozen=True, slots=True)
class LostResult:
    stream_seq: int


@dataclass(frozen=True, slots=True)
class Position:
    position: int
    eta_s: float
    at: float  # when it was polled (trio's clock)


@dataclass(frozen=True, slots=True)
class Taken:
    """A newer connection resumed the session."""


Inbound = JobResult | DeadJob | QueueLost | LostResult | Position | Taken


def apply(session: Session, item: Inbound) -> list[Output]:
    """What the bus reported, as the session's input."""
    if isinstance(item, JobResult):
        return session.receive_result(item)
    if isinstance(item, DeadJob):
        return session.dead_job(item.stream_seq, item.deliveries)
    if isinstance(item, QueueLost):
        return session.queue_lost()
    if isinstance(item, LostResult):
        return session.lost_result(item.stream_seq)
    if isinstance(item, Taken):
        return session.taken()
    return session.queue_status(item.position, item.eta_s, item.at)


MAX_SENDERS_LOGGED = 16  # worker identities named per session (one per worker at most)


@dataclass(slots=True)
class Live:
    """A session being served: the sans-IO core plus what the bus reported to it and its door
    has not applied yet (``inbox``, bounded by the gateway, in order)."""

    session: Session
    door: str = "websocket"
    credential: str | None = None  # the key its door was given (header or query), if any
    tenant: Tenant | None = None  # whose session it is, from admission on (with a keys file)
    queued: int = 0  # its jobs in the stream, as last counted into its tenant
    started: float = field(default_factory=time.monotonic)
    # None while empty: an empty deque is 760 bytes, and a session waiting in the queue has
    # nothing in it between two reports.
    inbox: deque[Inbound] | None = None
    over: bool = False  # closed: nothing more is delivered
    # The door's writer, woken for each item: a door runs a writer only while there is
    # something to write, so a session waiting in the queue is one task, not two.
    on_item: Callable[[], None] | None = None
    _room: trio.Event | None = None  # made by the first wait for room, set by progress
    # Its upload's block being decoded and published: bytes of the gateway's window (window.py)
    hold: Hold | None = None
    # Admitted to this model's queue and no job published yet: counted ahead in its ETA.
    expected: str | None = None
    # The NATS users that answered its jobs (None while none): its log line names them, so a
    # wrong transcript can be traced to the worker identity that sent it.
    answered_by: set[str] | None = None
    owner: str = ""  # a resumable session's connection: "<gateway>:<nonce>" (resumption.py)
    recorded: bool = False  # its record is in NATS (written before its first job)

    def heard_from(self, sender: str) -> None:
        if not sender:
            return
        if self.answered_by is None:
            self.answered_by = set()
        if len(self.answered_by) < MAX_SENDERS_LOGGED:
            self.answered_by.add(sender)

    def deliver(self, item: Inbound, bound: int) -> bool:
        """Queue ``item`` for the door; False if the session is over or ``bound`` items wait."""
        if self.over:
            return False
        if self.inbox is None:
            self.inbox = deque()
        elif len(self.inbox) >= bound:
            return False
        self.inbox.append(item)
        if self.on_item is not None:
            self.on_item()
        return True

    async def wait_for_room(self) -> None:
        """Until the session is below its in-flight bound (results free room)."""
        while not self.session.wants_audio and not self.session.closed:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    def progressed(self) -> None:
        """An item was applied: whoever waits for room looks again."""
        if self._room is not None:
            self._room.set()
            self._room = None


def clock() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # outside trio.run (unit tests of the bookkeeping)
        return time.monotonic()


def summary(live: Live) -> dict[str, Any]:
    """The session's log line, once it is over."""
    s = live.session
    line: dict[str, Any] = {
        "outcome": s.outcome or "incomplete",
        "chunks": s.chunks_total,
        "answered": s.chunks_answered,
        "cancelled_jobs": s.cancelled_jobs,
        "audio_s": round(s.audio_s, 2),
        "duration_s": round(time.monotonic() - live.started, 2),
    }
    if live.tenant is not None:
        line["key_name"] = live.tenant.name
    if live.answered_by:
        line["answered_by"] = sorted(live.answered_by)
    return line
