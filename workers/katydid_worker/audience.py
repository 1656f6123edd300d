"""Who will read a job's result: its client now, its client later (a session waiting to be
resumed), or nobody. Asked by the worker before a job takes engine time (``worker.py`` Rules 6,
7), and again for each job set aside (``job_order.py``).

Rule 1: before engine time, the session's record is read (``liveness.py``): a job whose session
has none is ``orphaned``; one whose check could not be made is transcribed. A deployment
without the bucket is said once, not per job.
Rule 2: a job whose session waits for its client (record ``detached``, or its gateway not heard
on ``katydid.gateways.*``) is set aside, unanswered (``set_aside.py`` Rule 1), while other jobs
are decoded; not when ``worker_set_aside_bytes`` is 0. A gateway not heard for half a beat is
asked whether it is there: NATS says "no responders" the instant its connection is gone.
Rule 3: a set-aside job no longer waits once its session is live again, ended, cancelled, or
the job is past its deadline (the worker then answers it as any job).
Rule 4: the sessions cancelled (the client left) are remembered, ``_CANCELLED_MAX`` at most,
oldest forgotten first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Protocol

import nats.errors
import structlog

from katydid.config import Config
from katydid.log import SampledLogger
from katydid.messages import Job
from katydid.session_record import gateway_ping_subject
from katydid_worker.liveness import Check, Liveness, Request, SessionLiveness
from katydid_worker.set_aside import Aside, Gateways, waiting_why

log = structlog.get_logger("katydid.worker")
ASK_TIMEOUT_S = 0.25  # a gateway asked whether it is there: no answer by then tells nothing
_CANCELLED_MAX = 10_000  # sessions remembered as cancelled (oldest forgotten first)
_LIVENESS_TIMEOUT_S = 1.0  # the most a record read may add to a job (it is ~0.3 ms when well)


class Checks(Protocol):
    """What the audience asks a session's liveness of (``SessionLiveness``; a fake in tests)."""

    async def check(self, session_id: str) -> Check: ...


class Audience:
    """Who will read one worker's jobs' results (Rules 1-4).

    Args:
        cfg: the worker's configuration.
        worker_id: for log lines.
        request: sends one request on the worker's NATS connection (subject, timeout_s).
        sampled: the worker's sampled logger.
        liveness: the sessions' checks (default: a ``SessionLiveness`` over ``request``).
        gateways: when each gateway was last heard (default: from ``cfg``).
    """

    def __init__(
        self,
        cfg: Config,
        worker_id: str,
        request: Request,
        sampled: SampledLogger,
        *,
        liveness: Checks | None = None,
        gateways: Gateways | None = None,
    ) -> None:
        self.worker_id = worker_id
        self._request = request
        self._sampled = sampled
        # Sessions have records only with resumption on (resume_window_s > 0): off, no job is
        # checked (a bucket left from a run with it on would make every job look orphaned).
        self._checking = cfg.resume_window_s > 0
        self._set_aside_on = self._checking and cfg.worker_set_aside_bytes > 0
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        if liveness is None:
            liveness = SessionLiveness(
                request,
                min(cfg.nats_request_timeout_s, _LIVENESS_TIMEOUT_S),
                window_s=cfg.resume_window_s,
            )
        self._liveness = liveness
        self._bucket_absent = False  # said once, not per job: a deployment without resumption
        self._gateways = Gateways(cfg.gateway_heartbeat_s) if gateways is None else gateways

    def cancelled(self, session_id: str) -> bool:
        """Whether the session's client left (its jobs are answered ``cancelled``)."""
        return session_id in self._cancelled

    async def on_cancel(self, msg: Any) -> None:
        self._cancelled[msg.data.decode(errors="replace")] = None
        while len(self._cancelled) > _CANCELLED_MAX:
            self._cancelled.popitem(last=False)

    def listening(self) -> None:
        """The gateways' subscription is up (again: beats were missed meanwhile)."""
        self._gateways.listening()

    async def on_gateway(self, msg: Any) -> None:
        self._gateways.heard(msg.subject.rsplit(".", 1)[-1])

    async def orphaned(self, job: Job) -> str | None:
        """Why nobody will read the job's result (the session's record is gone), or None: it
        has one, or the check could not be made (Rule 1)."""
        if not self._checking:
            return None
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

    async def waits_for_client(self, job: Job) -> str | None:
        """Why the job's session waits for its client (Rule 2), or None. The check was just
        made by ``orphaned``: this one is its cached verdict."""
        if not self._set_aside_on:
            return None  # setting aside is off
        check = await self._liveness.check(job.session_id)
        await self._ask_gateway(check.gateway)
        return waiting_why(check, self._gateways)

    async def still_waiting(self, entry: Aside) -> bool:
        """Whether a set-aside job still waits for its client (Rule 3; cached checks:
        ``liveness``)."""
        if self.cancelled(entry.session_id) or time.time() * 1000 > entry.deadline_unix_ms:
            return False  # answered now: cancelled / expired
        check = await self._liveness.check(entry.session_id)
        await self._ask_gateway(check.gateway)
        return waiting_why(check, self._gateways) is not None

    async def _ask_gateway(self, gateway_id: str) -> None:
        """Whether the gateway of a job's session is there, if not heard for a beat: NATS says
        "no responders" the instant its connection is gone (set_aside.py Rule 1)."""
        if not self._gateways.should_ask(gateway_id):
            return
        try:
            await self._request(gateway_ping_subject(gateway_id), ASK_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            self._gateways.gone(gateway_id)
            return
        except (nats.errors.Error, OSError, TimeoutError):
            return  # busy or unreachable: the heartbeats tell
        self._gateways.heard(gateway_id)
