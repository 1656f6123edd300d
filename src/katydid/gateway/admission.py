"""Admission and estimates, as plain code: the worker table (from heartbeats), the queue's state
(from polls), what the server offers, ETAs, queue positions, and readiness.

Nothing here waits or does I/O; the gateway feeds it heartbeats and lane polls and asks it
questions. ``clock`` is the gateway's monotonic clock (trio's, so tests run it under MockClock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from katydid import wire_json
from katydid.bus import LaneStats
from katydid.catalog import (
    ModelOffer,
    check_options,
    choose_model,
    english_only,
    family,
    offers_from,
    served_name,
)
from katydid.config import Config
from katydid.errors import ErrorCode, ProtocolError
from katydid.gateway.options import StartOptions
from katydid.messages import is_model_name

DEFAULT_JOB_S = 2.0  # assumed compute per job before any worker has reported
MAX_SEEN_MODELS = 256


@dataclass(slots=True)
class WorkerInfo:
    seen: float
    beat: dict[str, Any]  # the worker's last heartbeat, as sent

    @property
    def avg_compute_s(self) -> float | None:
        avg = self.beat.get("avg_compute_s")
        return float(avg) if isinstance(avg, int | float) and avg > 0 else None


class Admission:
    """Who serves what, how backed up each queue is, and who may wait for it."""

    def __init__(self, cfg: Config, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.clock = clock
        self.workers: dict[str, WorkerInfo] = {}
        # Queue state per (model, lane), from the last poll; the default model's is always
        # polled, others' while a worker serves them.
        self.lanes: dict[tuple[str, str], LaneStats] = {}
        self.default_model = served_name(cfg.model)
        # What /readyz waits for: the models of worker_models (as `katydid serve --workers
        # MODEL=N,...` sets it), else the default model.
        self.expected_models = {served_name(m) for m, _ in cfg.worker_plan()}
        # Every model a worker has served since start (bounded: anything on NATS may send a
        # heartbeat): one whose workers are all gone is a server-side outage, not a client error.
        self.seen_models: dict[str, None] = {}
        # Per model: counted into its backlog until the next poll sees them.
        self.published_since_poll: dict[str, int] = {}
        # Per model: sessions admitted that have not published a job yet (``expect``).
        self.expected: dict[str, int] = {}
        self.polled_at = -float("inf")
        # Partials only while the model's interactive queue is not backed up (finals come
        # first): read per audio frame by every streaming session, so decided once per poll.
        self.partials_allowed: dict[str, bool] = {}
        # Per model: partial jobs that may be in flight at once, gateway-wide (one less than its
        # live workers, at least one; Seating counts them): a final then finds a worker free of
        # partials, instead of one partial of every live session ahead of it in the queue.
        self.partial_slots: dict[str, int] = {}

    # --- heartbeats and polls ---

    def heartbeat(self, data: bytes) -> None:
        """A worker's heartbeat.

        Raises:
            ValueError: not a heartbeat, or its model is not a routable name (anything on NATS
                can publish here; such a name would make every queue poll fail).
        """
        try:
            beat = wire_json.loads(data)
            model = beat.get("model", "")
            worker_id = str(beat["id"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a heartbeat: {exc}") from None
        if not isinstance(model, str) or not is_model_name(model):
            raise ValueError(f"model {model!r} is not a routable name")
        self.workers[worker_id] = WorkerInfo(self.clock(), dict(beat))
        self.seen_models.pop(model, None)  # most recent last: the oldest goes first
        self.seen_models[model] = None
        while len(self.seen_models) > MAX_SEEN_MODELS:
            del self.seen_models[next(iter(self.seen_models))]

    def published(self, model: str) -> None:
        self.published_since_poll[model] = self.published_since_poll.get(model, 0) + 1

    def answered(self, model: str) -> None:
        """A job of ours is done: out of the backlog now, not at the next poll (a session that
        came within a poll of the last one's end was told to wait one job's time for an idle
        worker, and refused a max_wait_s under it). Below zero until the poll no longer
        counts it."""
        self.published_since_poll[model] = self.published_since_poll.get(model, 0) - 1

    def expect(self, model: str) -> None:
        """A session was admitted to ``model``: a job ahead of the next ones until it has
        published one or ended (``arrived``)."""
        self.expected[model] = self.expected.get(model, 0) + 1

    def arrived(self, model: str) -> None:
        left = self.expected.get(model, 0) - 1
        if left > 0:
            self.expected[model] = left
        else:
            self.expected.pop(model, None)

    def polled(self, lanes: dict[tuple[str, str], LaneStats], counted: dict[str, int]) -> None:
        """A poll's answer; ``counted``: the publishes made before it was asked (now in it)."""
        self.lanes = lanes
        for model, n in counted.items():
            self.published_since_poll[model] -= n
        self.polled_at = self.clock()
        for model, (workers, _) in self.capacities().items():
            interactive = lanes.get((model, "interactive"))
            self.partials_allowed[model] = interactive is not None and (
                interactive.pending < max(1, workers)
            )
            # One worker kept for finals: a final finds at most one partial on a worker.
            self.partial_slots[model] = max(1, workers - 1)

    def polled_models(self) -> list[str]:
        return sorted({self.default_model, *self.live_offers()})

    def forget_gone_workers(self) -> None:
        # Worker ids change when a worker restarts (pid in the id): forget the silent ones, so
        # the table (and the metrics labels) stay bounded by the workers really running.
        horizon = self.clock() - 30 * self.cfg.worker_heartbeat_s
        for worker_id in [k for k, w in self.workers.items() if w.seen < horizon]:
            del self.workers[worker_id]

    # --- what is offered, and at what wait ---

    def live_offers(self) -> dict[str, ModelOffer]:
        """The models live workers serve (from their heartbeats)."""
        horizon = self.clock() - 3 * self.cfg.worker_heartbeat_s
        return offers_from(
            (
                str(w.beat.get("model", "")),
                w.beat["multilingual"] if isinstance(w.beat.get("multilingual"), bool) else None,
            )
            for w in self.workers.values()
            if w.seen >= horizon and w.beat.get("model")
        )

    def offers(self) -> dict[str, ModelOffer]:
        """What the server offers: the models live workers serve, and the configured ones
        (``worker_models``, else the default) while none of their workers is up (warming up
        after ``katydid serve`` started, or restarting) with ``workers`` 0: a caller who names
        one is seated and waits, as one naming no model is, instead of being told the server
        does not offer what it was configured to."""
        live = self.live_offers()
        waiting = {
            m: ModelOffer(m, not english_only(m)) for m in self.expected_models if m not in live
        }
        return dict(sorted((live | waiting).items()))

    def _serving(self, model: str | None) -> list[WorkerInfo]:
        """Workers of ``model`` (None: all), by their heartbeats."""
        return [w for w in self.workers.values() if model is None or w.beat.get("model") == model]

    def live_workers(self, model: str | None = None) -> int:
        horizon = self.clock() - 3 * self.cfg.worker_heartbeat_s
        return sum(1 for w in self._serving(model) if w.seen >= horizon)

    def job_seconds(self, model: str | None = None) -> float:
        known = [w.avg_compute_s for w in self._serving(model) if w.avg_compute_s]
        return sum(known) / len(known) if known else DEFAULT_JOB_S

    def capacity(self, model: str | None = None) -> tuple[int, float]:
        """``(live workers, mean seconds per job)`` of ``model``'s workers (None: all), what
        every ETA is made of: a model's queue moves only as fast as its own workers."""
        return self.live_workers(model), self.job_seconds(model)

    def capacities(self) -> dict[str, tuple[int, float]]:
        return {model: self.capacity(model) for model in self.polled_models()}

    def eta_s(
        self, jobs_ahead: int, capacity: tuple[int, float] | None = None, model: str | None = None
    ) -> float:
        """Seconds until ``jobs_ahead`` queued jobs are done; pass ``capacity`` when estimating
        for many sessions at once, so the worker table is read once, not once per session."""
        workers, job_s = capacity if capacity is not None else self.capacity(model)
        return (jobs_ahead // max(1, workers) + 1) * job_s

    def backlog_eta_s(self, model: str | None = None, lane: str = "interactive") -> float:
        """ETA of a job queued now for ``model`` (default: the server's default model)."""
        model = model or self.default_model
        stats = self.lanes.get((model, lane))
        ahead = stats.pending + stats.in_progress if stats else 0
        ahead = max(0, ahead + self.published_since_poll.get(model, 0))
        if lane == "interactive":  # an upload's lane is known once decoded: counted here
            ahead += self.expected.get(model, 0)
        interactive = self.lanes.get((model, "interactive"))
        if lane == "bulk" and interactive is not None:
            # Interactive jobs go first, but at most bulk_every - 1 of them per bulk job.
            share = self.cfg.bulk_every - 1 if self.cfg.bulk_every > 0 else interactive.pending
            ahead += min(interactive.pending, share * (ahead + 1))
        return self.eta_s(ahead, model=model)

    def position(
        self,
        model: str,
        lane: str,
        oldest_stream_seq: int,
        capacity: tuple[int, float] | None,
        own_jobs: int = 0,
    ) -> tuple[int, float] | None:
        """``(position, eta_s)`` of a job at ``oldest_stream_seq``, or None before any poll;
        ``own_jobs``: the session's jobs in the stream, which are never ahead of it."""
        stats = self.lanes.get((model, lane))
        if stats is None:
            return None
        # Stream sequences are shared by all models' subjects and lanes, so the gap counts
        # other models' and lanes' jobs between too: an upper bound, exact when one model and
        # lane are served. The lane's pending count holds the session's own jobs: a 115 s
        # upload on an idle server heard "position 6" (its own later chunks) when its lane's
        # consumer had last delivered long before.
        others = stats.pending - own_jobs
        position = max(0, min(others, oldest_stream_seq - stats.delivered_stream_seq - 1))
        return position, self.eta_s(position, capacity, model=model)

    def admit(self, opts: StartOptions) -> tuple[str, dict[str, ModelOffer]]:
        """At start: the session's model, if it can honour the options (else
        ``unsupported_option``); refused with a retry-after only if its queue's ETA already
        exceeds the client's ``max_wait_s``. Returns the model and what the server offers.

        Raises:
            ProtocolError: ``unsupported_option`` or ``overloaded``.
        """
        offers = self.offers()
        try:
            offer = choose_model(offers, opts.model, self.default_model)
        except ProtocolError:
            if opts.model is None or not any(
                opts.model in (m, family(m)) for m in self.seen_models
            ):
                raise
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"model {opts.model!r} has no live worker now (its workers stopped);"
                " try again later",
                retry_after_s=max(1.0, 3 * self.cfg.worker_heartbeat_s),
            ) from None
        check_options(offer, offers, language=opts.language, task=opts.task)
        # The wait for a worker, not the ETA of the session's own result: with that job
        # counted, an idle server refused every client with max_wait_s under one job's time,
        # and its retry-after could never come true.
        wait = max(0.0, self.backlog_eta_s(offer.name) - self.capacity(offer.name)[1])
        if wait > opts.max_wait_s:
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"queue wait {wait:.1f} s exceeds max_wait_s {opts.max_wait_s:g}",
                retry_after_s=max(1.0, wait - opts.max_wait_s),
            )
        return offer.name, offers

    def readiness(
        self, nats_connected: bool, *, jobs_stored: bool = True
    ) -> tuple[bool, dict[str, Any]]:
        """Ready: NATS connected, the stream answered recently and took the last job published
        (``jobs_stored``), a worker seen, every configured model served, backlog ETA bounded."""
        eta = self.backlog_eta_s()
        missing = sorted(m for m in self.expected_models if m not in self.live_offers())
        checks = {
            "nats_connected": nats_connected,
            "stream_present": self.clock() - self.polled_at < 5 * self.cfg.queue_poll_s + 5,
            "jobs_stored": jobs_stored,
            "workers": self.live_workers() > 0,
            # A client that waits for /readyz and then names a configured model must not be
            # refused.
            "models_served": not missing,
            "backlog_eta_ok": eta <= self.cfg.ready_max_eta_s,
        }
        return all(checks.values()), checks | {
            "backlog_eta_s": round(eta, 1),
            "workers_live": self.live_workers(),
            "models_missing": missing,
        }
