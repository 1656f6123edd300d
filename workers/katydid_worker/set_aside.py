"""Jobs that wait for their client, set aside while a worker decodes live sessions' jobs.

A session whose client dropped (record ``detached``), or whose gateway died (its record names a
gateway this worker no longer hears on ``katydid.gateways.<id>``), may still be resumed for
``resume_window_s``: its jobs are valid, but nobody reads their results now. Decoded first (they
are ahead in the queue), they would make every live session wait behind them.

Rule 1: a job waits for its client when its session's record is ``detached``, or names a
gateway not heard for 3 heartbeats, judged only while this worker has listened that long and
hears some gateway (heard none: a deaf subscription or a NATS outage looks the same, and with
no live gateway there is nobody to give way to), or one NATS says is gone: a gateway not heard
for a beat is asked (``gateway_ping_subject``), and "no responders" comes the instant its
connection is gone, not 3 beats later.
Rule 2: a set-aside job is neither acked nor nak'ed (a nak counts toward max_deliver and would
kill it); ``in_progress`` keeps it, for all of them together every ``ack_wait/3``.
Rule 3: bounded by bytes of job bodies and by count (each is one of the consumer's
``max_ack_pending``); past a bound the oldest is decoded.
Rule 4: each is looked at again about once a second; its session live again (attached on a
heard gateway), ended, cancelled or past its deadline, it leaves the set (the worker answers it
as it would any job). A worker with nothing else to do decodes the oldest: it never idles while
it holds work; that result waits in the results stream for a resume.

Pure bookkeeping (no nats here), but for ``keep_alive``'s calls on the messages it holds.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import nats.errors

from katydid.session_record import DETACHED
from katydid_worker.liveness import Check, Liveness

SILENT_BEATS = 3  # a gateway not heard for this many heartbeats is taken as gone
ASK_AFTER_BEATS = 0.5  # a gateway not heard for this many is asked whether it is there
ASK_EVERY_S = 0.25  # at most this often per gateway
LOOK_EVERY_S = 1.0  # how often a set-aside job's session is looked at again
_MAX_GATEWAYS = 1024  # gateways remembered (the least recently heard forgotten first)


class Gateways:
    """When this worker last heard each gateway (Rule 1).

    Args:
        heartbeat_s: the gateways' ``gateway_heartbeat_s``.
        clock: monotonic clock (injectable for tests).
        max_gateways: how many are remembered.
    """

    def __init__(
        self,
        heartbeat_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_gateways: int = _MAX_GATEWAYS,
    ) -> None:
        # No heartbeat configured (0): no gateway is ever taken as gone.
        self._silent_after_s = SILENT_BEATS * heartbeat_s if heartbeat_s > 0 else float("inf")
        self._clock = clock
        self._max = max_gateways
        self._heard: OrderedDict[str, float] = OrderedDict()
        self._since: float | None = None  # listening since (None: not yet)
        self._ask_after_s = ASK_AFTER_BEATS * heartbeat_s if heartbeat_s > 0 else float("inf")
        self._asked: OrderedDict[str, float] = OrderedDict()  # gateway -> when last asked
        self._gone: OrderedDict[str, float] = OrderedDict()  # NATS said: no such gateway

    def listening(self) -> None:
        """The subscription is up (again, after a reconnect: beats were missed meanwhile, and
        every gateway would look silent)."""
        self._since = self._clock()

    def heard(self, gateway_id: str) -> None:
        self._remember(self._heard, gateway_id)
        self._gone.pop(gateway_id, None)

    def gone(self, gateway_id: str) -> None:
        """NATS answered "no responders" for the gateway: its connection is gone."""
        self._remember(self._gone, gateway_id)

    def should_ask(self, gateway_id: str) -> bool:
        """Whether to ask if ``gateway_id`` is there: not heard for a beat, not asked lately."""
        now = self._clock()
        if not gateway_id or gateway_id in self._gone:
            return False
        last = self._heard.get(gateway_id)
        if last is not None and now - last < self._ask_after_s:
            return False
        asked = self._asked.get(gateway_id)
        if asked is not None and now - asked < ASK_EVERY_S:
            return False
        self._remember(self._asked, gateway_id)
        return True

    def _remember(self, seen: OrderedDict[str, float], gateway_id: str) -> None:
        seen[gateway_id] = self._clock()
        seen.move_to_end(gateway_id)
        while len(seen) > self._max:
            seen.popitem(last=False)

    def silent(self, gateway_id: str) -> bool:
        """Whether ``gateway_id`` has not been heard for ``SILENT_BEATS`` heartbeats (Rule 1)."""
        now = self._clock()
        if gateway_id in self._gone:
            return True  # NATS said so: no waiting for beats to be missed
        if not gateway_id or self._since is None or now - self._since < self._silent_after_s:
            return False
        if not self._heard or now - next(reversed(self._heard.values())) >= self._silent_after_s:
            return False  # nobody heard lately: cannot tell, and nobody to give way to
        last = self._heard.get(gateway_id)
        return last is None or now - last >= self._silent_after_s


def waiting_why(check: Check, gateways: Gateways) -> str | None:
    """Why a job's session waits for its client (``detached``, ``gateway_silent``), or None:
    its result is read now, or nothing tells (no bucket, failed read, unparsed record)."""
    if check.liveness != Liveness.LIVE:
        return None
    if check.state == DETACHED:
        return "detached"
    if gateways.silent(check.gateway):
        return "gateway_silent"
    return None


@dataclass(slots=True)
class Aside:
    key: int  # its place in the set (age order)
    msg: Any  # the job's JetStream message (nats-py Msg)
    session_id: str
    deadline_unix_ms: int
    size: int  # the job's body bytes
    since: float  # set aside then (monotonic)
    looked: float  # last looked at (monotonic)


class SetAside:
    """The jobs one worker holds aside, oldest first (Rules 3, 4).

    Args:
        max_bytes: bound on their bodies' bytes.
        max_jobs: bound on their number.
        look_every_s: how often each is looked at again.
        clock: monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        max_bytes: int,
        max_jobs: int,
        *,
        look_every_s: float = LOOK_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_jobs = max_jobs
        self._look_every_s = look_every_s
        self._clock = clock
        self._held: dict[int, Aside] = {}  # insertion order is age order
        self._ids = itertools.count()
        self._by_session: dict[str, int] = {}  # jobs held per session (for transitions)
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def holds(self, session_id: str) -> bool:
        return session_id in self._by_session

    def add(self, msg: Any, session_id: str, deadline_unix_ms: int) -> Aside:
        now = self._clock()
        key = next(self._ids)
        entry = Aside(key, msg, session_id, deadline_unix_ms, len(msg.data or b""), now, now)
        self._held[key] = entry
        self._by_session[session_id] = self._by_session.get(session_id, 0) + 1
        self.bytes += entry.size
        return entry

    def over(self) -> bool:
        """Past a bound: the oldest must go (Rule 3)."""
        return bool(self._held) and (self.bytes > self.max_bytes or len(self._held) > self.max_jobs)

    def oldest(self) -> Aside | None:
        """The oldest, taken out of the set (to decode), or None."""
        for key in self._held:
            return self._take(key)
        return None

    def restore(self, entry: Aside) -> None:
        """``entry``, taken out by ``oldest`` and not answered, back in the set as the oldest
        (its decode gave way to a live session's job)."""
        self._held = {entry.key: entry, **self._held}
        self._by_session[entry.session_id] = self._by_session.get(entry.session_id, 0) + 1
        self.bytes += entry.size

    def due(self) -> list[Aside]:
        """Those not looked at for ``look_every_s``, oldest first, marked looked at now (they
        stay in the set until ``release``)."""
        now = self._clock()
        out = [e for e in self._held.values() if now - e.looked >= self._look_every_s]
        for e in out:
            e.looked = now
        return out

    def look_again(self, entries: list[Aside]) -> None:
        """``entries`` were not looked at after all (the pass ran out of time): due at once."""
        for e in entries:
            e.looked = float("-inf")

    def release(self, entry: Aside) -> None:
        """``entry`` leaves the set (it is decoded or answered now)."""
        if self._held.get(entry.key) is entry:
            self._take(entry.key)

    def take_all(self) -> list[Aside]:
        """Every one, oldest first, out of the set (the worker stops)."""
        out = list(self._held.values())
        self._held.clear()
        self._by_session.clear()
        self.bytes = 0
        return out

    def messages(self) -> list[Any]:
        return [e.msg for e in self._held.values()]

    def _take(self, key: int) -> Aside:
        entry = self._held.pop(key)
        self.bytes -= entry.size
        left = self._by_session.pop(entry.session_id) - 1
        if left:
            self._by_session[entry.session_id] = left
        return entry


async def keep_alive(held: Callable[[], list[Any]], every_s: float) -> None:
    """Every ``every_s``, ``in_progress`` for every job ``held()`` lists (Rule 2): one pass for
    them all, not a timer per job. Runs until cancelled."""
    while True:
        await anyio.sleep(every_s)
        for msg in held():  # a copy: the set changes while this awaits
            try:
                await msg.in_progress()
            except nats.errors.Error:
                pass  # reconnecting: the next pass may still make it within ack_wait
