"""Readers parked while their client has nothing to say: one epoll set and one task for all.

A session that has sent ``stop`` waits for its results, minutes in a long queue, and its client
says nothing more until it closes. Its reader still has to notice a client that leaves (its
jobs are then cancelled) and the session's deadline. Awaiting the socket the usual way keeps a
chain of ~13 coroutine frames (the door's read, the WebSocket's, trio's stream, socket and epoll
layers), a cancel scope with its status and its function objects alive per session: ~4 KB of
Python objects of the ~14 KB a waiting session held, and more again in the heap they fragment
(measured with ``python -m tests.chaos.waiting``). A parked reader holds one frame instead: its
socket is registered in this epoll set, and one task, alive while anything is parked, wakes it
when its socket is readable (data, a close, a reset) or its deadline has come. The reader then
reads the usual way.

Rule 1: a parked reader is woken exactly once (readable, deadline) or cancelled, and its socket
is out of the set before it runs again, whichever came first.
Rule 2: only a socket with nothing buffered above it parks (``ServerWebSocket.parkable``); a TLS
stream, a platform without epoll or a socket the set refuses is read the usual way.
"""

from __future__ import annotations

import heapq
import itertools
import math
import select
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import outcome
import trio

# Readable, or the peer shut its side (an error or hang-up is reported whatever the mask).
_EVENTS = getattr(select, "EPOLLIN", 1) | getattr(select, "EPOLLRDHUP", 0x2000)


class Wake(Enum):
    READABLE = "readable"
    DEADLINE = "deadline"


@dataclass(slots=True)
class _Parked:
    parking: Parking
    fd: int
    task: trio.lowlevel.Task
    seq: int

    def abort(self, _: object) -> trio.lowlevel.Abort:
        """Cancelled while parked: out of the set."""
        self.parking._forget(self.fd)
        return trio.lowlevel.Abort.SUCCEEDED


@dataclass
class Parking:
    """Parked readers of one door; ``nursery`` runs the waking task while any is parked."""

    nursery: trio.Nursery
    _epoll: select.epoll | None = None
    _parked: dict[int, _Parked] = field(default_factory=dict)
    # (deadline, seq, fd); an entry whose seq is no longer the fd's is stale, dropped when met
    # (and all at once when they outnumber the live ones: a session pinged for hours re-parks
    # every ping).
    _deadlines: list[tuple[float, int, int]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _running: bool = False
    _waiting: trio.CancelScope | None = None

    @property
    def parked(self) -> int:
        return len(self._parked)

    def park(self, fd: int, deadline: float) -> Coroutine[Any, Any, Wake] | None:
        """Park the calling task until ``fd`` is readable or ``deadline`` (trio's clock) has
        come: await what this returns (at once: the socket is in the set from now on; returned
        rather than awaited here, so a parked reader holds one frame fewer).

        Returns:
            The wait, which returns why the reader woke; None if ``fd`` cannot be parked here
            (read it the usual way).
        """
        if self._epoll is None:
            if not hasattr(select, "epoll"):
                return None
            self._epoll = select.epoll()
        try:
            self._epoll.register(fd, _EVENTS)
        except OSError:  # closed, or already in the set: not for parking
            return None
        parked = _Parked(self, fd, trio.lowlevel.current_task(), next(self._seq))
        self._parked[fd] = parked
        if not math.isinf(deadline):
            heapq.heappush(self._deadlines, (deadline, parked.seq, fd))
            if len(self._deadlines) > 2 * len(self._parked) + 64:
                self._compact()
        if not self._running:
            self._running = True
            self.nursery.start_soon(self._run)
        elif self._waiting is not None and deadline < self._waiting.deadline:
            self._waiting.deadline = deadline
        # Returned, not awaited here: awaited by the caller at once (a frame fewer).
        return trio.lowlevel.wait_task_rescheduled(parked.abort)  # noqa: ASYNC105

    def _forget(self, fd: int) -> _Parked | None:
        parked = self._parked.pop(fd, None)
        if parked is not None and self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:  # pragma: no cover - the socket was closed under its reader
                pass
        if not self._parked and self._waiting is not None:
            self._waiting.cancel()  # nothing left to wake: the task ends (a drain waits for it)
        return parked

    def _wake(self, fd: int, why: Wake) -> None:
        parked = self._forget(fd)
        if parked is not None:
            trio.lowlevel.reschedule(parked.task, outcome.Value(why))

    def _compact(self) -> None:
        live = {fd: p.seq for fd, p in self._parked.items()}
        self._deadlines = [e for e in self._deadlines if live.get(e[2]) == e[1]]
        heapq.heapify(self._deadlines)

    async def _run(self) -> None:
        """Wake what is due until nothing is parked (started again by the next ``park``)."""
        assert self._epoll is not None
        epoll = self._epoll
        try:
            while self._parked:
                first = self._deadlines[0][0] if self._deadlines else math.inf
                with trio.CancelScope(deadline=first) as self._waiting:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                self._waiting = None
                for fd, _ in epoll.poll(0, max(1, len(self._parked))):
                    self._wake(fd, Wake.READABLE)
                now = trio.current_time()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, seq, fd = heapq.heappop(self._deadlines)
                    parked = self._parked.get(fd)
                    if parked is not None and parked.seq == seq:
                        self._wake(fd, Wake.DEADLINE)
        finally:
            self._running = False
            self._waiting = None
