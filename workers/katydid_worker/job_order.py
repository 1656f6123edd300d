"""Which job a worker takes next: from which lane, and when a set-aside one comes first.

Rule 1: the priority lane is tried before all (a resumed session's first partial: one per
resume, bounded by the gateways), then the interactive lane, so a 3 s clip never waits behind a
long file; every ``bulk_every``-th job comes from bulk when it has any, so uploads are never
starved. With every lane empty the worker waits on the interactive lane (a live utterance is
taken the moment it comes); the others are asked again after it.
Rule 2: the next job is: a set-aside one whose session is live again (or ended, cancelled,
expired: answered as any job; ``audience.py`` Rule 3); else the oldest set-aside one past the
bound (``set_aside.py`` Rule 3); else a fetched one; else, with every lane empty, the oldest
set-aside one (a worker never idles holding work). Only a fetched job may be set aside.
Rule 3: a pass over the set-aside jobs due a look takes at most ``_REVIEW_BUDGET_S``: each check
is a read when its session's verdict is older than a second, and with NATS slow (a read may
take its whole timeout) the rest go next time, not before the next fetch.
Rule 4: stopping, every job held aside is nak'ed at once (no delay: another worker takes it),
never acked or answered (``worker.py`` Rule 5).
Rule 5: a set-aside job decoded only because nothing else was queued gives way: while it
decodes, the lanes are asked every ``_PREEMPT_POLL_S``; a job fetched meanwhile stops the decode
(whisper.cpp's abort callback), the set-aside job goes back to the set as its oldest, unanswered,
and the fetched one is next. A live session's job never waits behind a result nobody reads
yet (a new session right after a gateway's death would otherwise wait out a decode).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import anyio
import nats.errors
import structlog

from katydid.config import Config
from katydid.log import SampledLogger
from katydid.messages import Job
from katydid_worker.audience import Audience
from katydid_worker.set_aside import Aside, SetAside
from katydid_worker.worker_stats import WorkerStats

log = structlog.get_logger("katydid.worker")
# The wait for a job when both lanes are empty: a live utterance ends it at once, but a file's
# first chunk (bulk) waits it out. At 0.5 s a 90 s upload's first two chunks sat 0.3 and 0.45 s
# in the queue of idle workers (wall 2.1 s on 2 workers, AMD EPYC, 2 cores); at 0.1 s an idle
# worker asks ~30 times a second, which NATS answers for next to nothing.
_FETCH_INTERACTIVE_S = 0.1
_REVIEW_BUDGET_S = 0.1  # time for one pass over set-aside jobs before the next fetch
_PREEMPT_POLL_S = 0.05  # how often the lanes are asked while an idle set-aside job decodes


def lane_order(interactive_streak: int, bulk_every: int) -> tuple[str, str, str]:
    """The order a worker tries the lanes in: priority, then interactive (a 3 s clip never waits
    behind a long file), except that after ``bulk_every - 1`` interactive jobs in a row bulk
    comes before interactive, so a steady stream of live sessions cannot starve uploads (0:
    strict priority)."""
    if bulk_every > 0 and interactive_streak >= bulk_every - 1:
        return ("priority", "bulk", "interactive")
    return ("priority", "interactive", "bulk")


class JobOrder:
    """One worker's next job, and the jobs it holds aside (Rules 1-4).

    Args:
        cfg: the worker's configuration.
        worker_id: for log lines.
        audience: who will read the jobs' results (whether a set-aside job still waits).
        stats: the worker's heartbeat counts (``jobs_set_aside``).
        sampled: the worker's sampled logger.
        stopping: set when the worker stops (an empty fetch then takes no set-aside job).
    """

    def __init__(
        self,
        cfg: Config,
        worker_id: str,
        audience: Audience,
        stats: WorkerStats,
        sampled: SampledLogger,
        stopping: anyio.Event,
    ) -> None:
        self.cfg = cfg
        self.worker_id = worker_id
        self.stats = stats
        self._audience = audience
        self._sampled = sampled
        self._stopping = stopping
        self._interactive_streak = 0  # interactive jobs taken since the last bulk one
        # Each set-aside job is one of its consumer's max_ack_pending: half of it at most, so
        # other workers still get jobs.
        self._aside = SetAside(
            cfg.worker_set_aside_bytes, max(1, cfg.consumer_max_ack_pending // 2)
        )
        self._released: deque[Aside] = deque()  # out of the set, decoded before any fetch
        # Rule 5: the set-aside job decoded for want of anything else, and the fresh job that
        # arrived meanwhile (it stops that decode and goes next)
        self.idle: Aside | None = None
        self._fetched: Any = None
        self._aside_open = False  # logged once per transition, not per job

    async def next_job(self, lanes: dict[str, Any]) -> tuple[Any, bool]:
        """The next job (Rule 2), and whether it is fresh from a lane (it may be set aside)."""
        self.idle = None
        if self._fetched is not None:  # it stopped an idle decode (Rule 5)
            msg, self._fetched = self._fetched, None
            return msg, True
        if not self._released:
            due = self._aside.due()
            budget = time.monotonic() + _REVIEW_BUDGET_S  # Rule 3
            for i, entry in enumerate(due):
                if time.monotonic() > budget:
                    self._aside.look_again(due[i:])
                    break
                if not await self._audience.still_waiting(entry):
                    self._aside.release(entry)
                    self._released.append(entry)
        if self._released:
            return self._released.popleft().msg, False
        if self._aside_open and not self._aside:
            log.info("set_aside_empty", worker=self.worker_id)
            self._aside_open = False
        if self._aside.over():
            return self._take_oldest("bound").msg, False
        msg = await self._next(lanes, linger=not self._aside)
        if msg is None and self._aside and not self._stopping.is_set():
            self.idle = self._take_oldest("idle")
            return self.idle.msg, False
        return msg, True

    def gave_way(self) -> bool:
        """A job was fetched while the idle set-aside one decoded: that decode should stop."""
        return self._fetched is not None

    async def watch_lanes(self, lanes: dict[str, Any]) -> None:
        """While ``idle`` decodes: the lanes asked until a job comes (Rule 5). Runs until it
        fetches one or is cancelled (the decode ended)."""
        while self._fetched is None:
            await anyio.sleep(_PREEMPT_POLL_S)
            self._fetched = await self._next(lanes, linger=False)

    def put_back(self) -> None:
        """The idle decode stopped for a fetched job: its job back in the set as the oldest,
        neither acked nor answered (Rule 5)."""
        entry, self.idle = self.idle, None
        if entry is not None:
            self._aside.restore(entry)
            self.stats.set_aside_preempted += 1

    def held(self) -> list[Any]:
        """The jobs set aside or released from it, not yet answered: kept in progress (a
        burst of resumed sessions' jobs may take longer than ack_wait to decode)."""
        return [*(e.msg for e in self._released), *self._aside.messages()]

    def holding(self) -> int:
        """How many jobs ``held`` lists (the heartbeat's ``set_aside_now``)."""
        return len(self._aside) + len(self._released)

    def _take_oldest(self, why: str) -> Aside:
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
        return entry

    def set_aside(self, msg: Any, job: Job, why: str) -> None:
        """Holds a fresh job whose session waits for its client (``audience.py`` Rule 2)."""
        if not self._aside_open:
            log.info("set_aside_started", worker=self.worker_id, why=why)
            self._aside_open = True
        if not self._aside.holds(job.session_id):  # a session's transition, not each job
            self._sampled.info(
                "session_set_aside", worker=self.worker_id, session_id=job.session_id, why=why
            )
        self._aside.add(msg, job.session_id, job.deadline_unix_ms)
        self.stats.jobs_set_aside += 1

    async def give_back_aside(self) -> None:
        """Stopping: every job held aside back to the stream at once (Rule 4)."""
        held = [*self._released, *self._aside.take_all()]
        self._released.clear()
        for entry in held:
            try:
                await entry.msg.nak()  # no delay: another worker takes it now
            except (nats.errors.Error, OSError):
                pass  # redelivered after ack_wait anyway
        if held:
            log.info("set_aside_returned", worker=self.worker_id, jobs=len(held))

    async def _next(self, lanes: dict[str, Any], *, linger: bool = True) -> Any:
        """The next job: each lane asked in ``lane_order`` for one queued now; with all empty,
        a wait on the interactive lane (a live utterance is taken the moment it comes; bulk is
        asked again after it), unless not ``linger`` (jobs are set aside: decode one)."""
        try:
            for lane in lane_order(self._interactive_streak, self.cfg.bulk_every):
                msg = await lanes[lane].take_now()
                if msg is not None:
                    if lane != "priority":  # a few per resume: not a turn of interactive's
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
