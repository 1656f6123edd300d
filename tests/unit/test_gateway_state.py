"""Admission bookkeeping that needs no sockets: worker table, ETA and queue-position estimates."""

from __future__ import annotations

import json
import time

from katydid.bus import LaneStats
from katydid.config import Config
from katydid.errors import ErrorCode, ProtocolError
from katydid.gateway.admission import Admission
from katydid.gateway.options import StartOptions


class _Table(Admission):
    def _beat(self, data: bytes) -> None:
        try:
            self.heartbeat(data)
        except ValueError:
            pass  # refused; the gateway logs it (sampled)


def _admission(cfg: Config) -> _Table:
    return _Table(cfg, time.monotonic)


def _beat(worker: str, avg: float | None = 0.5, model: str = "tiny.en-q8_0") -> bytes:
    return json.dumps({"id": worker, "model": model, "busy": False, "avg_compute_s": avg}).encode()


def test_worker_table_forgets_silent_workers_and_counts_live_ones() -> None:
    gw = _admission(Config(worker_heartbeat_s=1.0))
    gw._beat(_beat("a"))
    gw._beat(_beat("b", avg=1.5))
    gw._beat(b"not json")  # a bad heartbeat is logged (sampled), never raised
    assert gw.live_workers() == 2
    assert gw.job_seconds() == 1.0
    gw.workers["b"].seen -= 3.5  # silent for longer than 3 heartbeats: not live
    assert gw.live_workers() == 1
    gw.forget_gone_workers()
    assert set(gw.workers) == {"a", "b"}
    gw.workers["b"].seen -= 60.0  # silent for 30 heartbeats: forgotten
    gw.forget_gone_workers()
    assert set(gw.workers) == {"a"}


def test_backlog_eta_counts_jobs_published_since_the_last_poll() -> None:
    gw = _admission(Config(worker_heartbeat_s=1.0))
    gw._beat(_beat("a", avg=2.0))
    gw._beat(_beat("b", avg=2.0))
    gw.lanes = {
        ("tiny.en-q8_0", "interactive"): LaneStats(
            pending=10, in_progress=2, delivered_stream_seq=100
        )
    }
    assert gw.backlog_eta_s() == (12 // 2 + 1) * 2.0
    gw.published_since_poll = {"tiny.en-q8_0": 8}
    assert gw.backlog_eta_s() == (20 // 2 + 1) * 2.0
    # One reading of the worker table, reused across sessions, gives the same estimate.
    assert gw.capacity() == (2, 2.0)
    assert gw.eta_s(20, gw.capacity()) == gw.eta_s(20) == (20 // 2 + 1) * 2.0


def test_each_model_has_its_own_queue_and_workers() -> None:
    gw = _admission(Config(worker_heartbeat_s=1.0))
    gw._beat(_beat("a", avg=2.0))
    gw._beat(_beat("b", avg=2.0))
    gw._beat(_beat("c", avg=6.0, model="base"))
    gw.lanes = {
        ("tiny.en-q8_0", "interactive"): LaneStats(10, 0, 100),
        ("base", "interactive"): LaneStats(3, 1, 90),
        ("base", "bulk"): LaneStats(5, 0, 80),
    }
    assert gw.capacity("base") == (1, 6.0)
    assert gw.capacity("tiny.en-q8_0") == (2, 2.0)
    assert gw.backlog_eta_s() == (10 // 2 + 1) * 2.0  # the default model
    assert gw.backlog_eta_s("base") == (4 + 1) * 6.0
    assert gw.backlog_eta_s("base", "bulk") == (5 + 3 + 1) * 6.0  # behind base's interactive
    offers = gw.offers()
    assert [(o.name, o.multilingual, o.workers) for o in offers.values()] == [
        ("base", True, 1),
        ("tiny.en-q8_0", False, 2),
    ]


def test_bulk_eta_counts_the_bulk_share() -> None:
    gw = _admission(Config(worker_heartbeat_s=1.0, bulk_every=4))
    gw._beat(_beat("a", avg=1.0))
    gw.lanes = {
        ("tiny.en-q8_0", "interactive"): LaneStats(100, 0, 0),
        ("tiny.en-q8_0", "bulk"): LaneStats(1, 0, 0),
    }
    # 1 bulk job ahead; 3 interactive jobs per bulk job: 1 + 3 * 2 ahead, not all 100.
    assert gw.backlog_eta_s(lane="bulk") == (1 + 6 + 1) * 1.0
    strict = _admission(Config(worker_heartbeat_s=1.0, bulk_every=0))
    strict._beat(_beat("a", avg=1.0))
    strict.lanes = gw.lanes
    assert strict.backlog_eta_s(lane="bulk") == (1 + 100 + 1) * 1.0


def test_readyz_waits_for_every_configured_model() -> None:
    gw = _admission(Config(worker_heartbeat_s=1.0, worker_models="tiny.en-q8_0=2,base-q8_0=1"))
    gw._beat(_beat("a"))
    ready, detail = gw.readiness(True)
    assert not ready
    assert detail["models_served"] is False
    assert detail["models_missing"] == ["base-q8_0"]
    gw._beat(_beat("b", model="base-q8_0"))
    assert gw.readiness(True)[1]["models_served"] is True


def test_a_heartbeat_with_an_unroutable_model_name_is_refused() -> None:
    # Anything on NATS can publish a heartbeat; a name no subject can hold would make every
    # queue poll (one consumer request per offered model) fail.
    gw = _admission(Config(worker_heartbeat_s=1.0))
    gw._beat(_beat("a", model="tiny model/../x"))
    gw._beat(_beat("b", model="base.en"))
    assert set(gw.workers) == {"b"}
    assert set(gw.live_offers()) == {"base.en"}


def test_readyz_names_each_reason_it_fails() -> None:
    clock = [1000.0]
    gw = Admission(
        Config(worker_heartbeat_s=1.0, queue_poll_s=1.0, ready_max_eta_s=60.0), lambda: clock[0]
    )
    ready, detail = gw.readiness(True)
    assert not ready
    assert (detail["workers"], detail["stream_present"]) == (False, False)  # never polled
    gw.heartbeat(_beat("a", avg=1.0))
    gw.polled({("tiny.en-q8_0", "interactive"): LaneStats(0, 0, 0)}, {})
    assert gw.readiness(True) == (True, gw.readiness(True)[1])
    assert gw.readiness(False)[1]["nats_connected"] is False
    assert not gw.readiness(False)[0]
    gw.polled({("tiny.en-q8_0", "interactive"): LaneStats(100, 0, 0)}, {})  # 101 s of work
    ready, detail = gw.readiness(True)
    assert (ready, detail["backlog_eta_ok"], detail["backlog_eta_s"]) == (False, False, 101.0)
    gw.polled({("tiny.en-q8_0", "interactive"): LaneStats(0, 0, 0)}, {})
    clock[0] += 11.0  # no poll answered for more than 5 polls + 5 s
    gw.heartbeat(_beat("a", avg=1.0))
    ready, detail = gw.readiness(True)
    assert (ready, detail["stream_present"]) == (False, False)


def test_a_job_answered_leaves_the_backlog_at_once_not_at_the_next_poll() -> None:
    # An idle worker, and a session that came right after the last one's job was answered:
    # the poll still counted that job, so the newcomer was told to wait a job's time (0.6 s)
    # and refused with max_wait_s 0.5.
    model = "tiny.en-q8_0"
    gw = Admission(Config(), lambda: 1000.0)
    gw.heartbeat(_beat("a", avg=1.0))
    gw.polled({(model, "interactive"): LaneStats(0, 1, 0)}, {})  # the last job, in progress
    assert gw.backlog_eta_s(model) == 2.0  # it and the next one
    gw.answered(model)
    assert gw.backlog_eta_s(model) == 1.0  # only the next one: no wait for a worker
    counted = dict(gw.published_since_poll)  # a poll asked now...
    gw.polled({(model, "interactive"): LaneStats(0, 0, 1)}, counted)  # ...no longer counts it
    assert gw.backlog_eta_s(model) == 1.0
    # Published and answered between two polls: never ahead of anyone.
    gw.published(model)
    gw.answered(model)
    assert gw.backlog_eta_s(model) == 1.0
    # A poll that had already let go of it when answered: nothing goes below an empty queue.
    gw.polled({(model, "interactive"): LaneStats(0, 0, 1)}, dict(gw.published_since_poll))
    gw.answered(model)
    assert gw.backlog_eta_s(model) == 1.0


def _start(model: str | None) -> StartOptions:
    return StartOptions("pcm_s16le", 16000, 1, "auto", False, False, 60.0, None, model)


def _refusal(gw: Admission, model: str) -> ProtocolError:
    try:
        gw.admit(_start(model))
    except ProtocolError as exc:
        return exc
    raise AssertionError(f"{model!r} was admitted")


def test_configured_models_are_offered_and_seated_while_their_workers_warm_up() -> None:
    # `katydid serve --workers tiny.en-q8_0=2,base-q8_0=1` has printed its URLs; no worker has
    # sent its first heartbeat yet. A caller naming a configured model is seated (it waits, as
    # one naming no model does), by its full name or its family's.
    gw = _admission(Config(worker_heartbeat_s=1.0, worker_models="tiny.en-q8_0=2,base-q8_0=1"))
    assert [(o.name, o.multilingual, o.workers) for o in gw.offers().values()] == [
        ("base-q8_0", True, 0),
        ("tiny.en-q8_0", False, 0),
    ]
    assert gw.admit(_start("tiny.en"))[0] == "tiny.en-q8_0"
    assert gw.admit(_start("base-q8_0"))[0] == "base-q8_0"
    assert gw.admit(_start("base"))[0] == "base-q8_0"
    assert gw.admit(_start(None))[0] == "tiny.en-q8_0"
    # What nobody configured (and no worker announced) is still the client's error.
    refused = _refusal(gw, "large-v3")
    assert refused.code is ErrorCode.UNSUPPORTED_OPTION
    assert "base-q8_0 (99 languages), tiny.en-q8_0 (en)" in str(refused)
    # Not ready until every configured model has a live worker, though it is offered.
    assert gw.readiness(True)[1]["models_missing"] == ["base-q8_0", "tiny.en-q8_0"]


def test_a_model_whose_workers_are_gone_is_a_server_outage_not_a_client_error() -> None:
    gw = _admission(Config(worker_heartbeat_s=1.0))
    gw._beat(_beat("a", model="small.en-q5_1"))  # a worker of a model nobody configured here
    assert gw.admit(_start("small.en"))[0] == "small.en-q5_1"
    gw.workers["a"].seen -= 60.0  # gone
    gw.forget_gone_workers()
    refused = _refusal(gw, "small.en-q5_1")
    assert refused.code is ErrorCode.OVERLOADED
    assert refused.retry_after_s == 3.0
    assert "no live worker now" in str(refused)
    assert _refusal(gw, "small.en").code is ErrorCode.OVERLOADED  # its family's name too
    assert _refusal(gw, "medium").code is ErrorCode.UNSUPPORTED_OPTION


def test_a_session_s_own_jobs_are_never_ahead_of_it() -> None:
    # A 115 s upload on an idle server: its 12 chunks are the bulk lane's only pending jobs, and
    # the bulk consumer last delivered long ago (interactive jobs took the sequences between).
    gw = _admission(Config(worker_heartbeat_s=1.0))
    gw._beat(_beat("a", avg=1.0))
    gw.lanes = {("tiny.en-q8_0", "bulk"): LaneStats(pending=12, in_progress=0,
                                                    delivered_stream_seq=50)}  # fmt: skip
    assert gw.position("tiny.en-q8_0", "bulk", 101, None, own_jobs=12) == (0, 1.0)
    # Three jobs of others ahead of it are still counted.
    gw.lanes[("tiny.en-q8_0", "bulk")] = LaneStats(pending=15, in_progress=0,
                                                   delivered_stream_seq=97)  # fmt: skip
    assert gw.position("tiny.en-q8_0", "bulk", 101, None, own_jobs=12) == (3, 4.0)
