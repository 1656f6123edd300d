"""Gateway bookkeeping that needs no sockets: worker table, ETA and queue-position estimates."""

from __future__ import annotations

import json

import pytest

from katydid.config import Config
from katydid.gateway import Gateway
from katydid.natsio import LaneStats


def _beat(worker: str, avg: float | None = 0.5, model: str = "tiny.en-q8_0") -> bytes:
    return json.dumps({"id": worker, "model": model, "busy": False, "avg_compute_s": avg}).encode()


def test_worker_table_forgets_silent_workers_and_counts_live_ones() -> None:
    gw = Gateway(Config(worker_heartbeat_s=1.0))
    gw._on_worker(_beat("a"))
    gw._on_worker(_beat("b", avg=1.5))
    gw._on_worker(b"not json")  # a bad heartbeat is logged (sampled), never raised
    assert gw.live_workers() == 2
    assert gw.job_seconds() == 1.0
    gw.workers["b"].seen -= 3.5  # silent for longer than 3 heartbeats: not live
    assert gw.live_workers() == 1
    gw._forget_gone_workers()
    assert set(gw.workers) == {"a", "b"}
    gw.workers["b"].seen -= 60.0  # silent for 30 heartbeats: forgotten
    gw._forget_gone_workers()
    assert set(gw.workers) == {"a"}


def test_backlog_eta_counts_jobs_published_since_the_last_poll() -> None:
    gw = Gateway(Config(worker_heartbeat_s=1.0))
    gw._on_worker(_beat("a", avg=2.0))
    gw._on_worker(_beat("b", avg=2.0))
    gw.lanes = {
        ("tiny.en-q8_0", "interactive"): LaneStats(
            pending=10, in_progress=2, delivered_stream_seq=100
        )
    }
    assert gw.backlog_eta_s() == (12 // 2 + 1) * 2.0
    gw._published_since_poll = {"tiny.en-q8_0": 8}
    assert gw.backlog_eta_s() == (20 // 2 + 1) * 2.0
    # One reading of the worker table, reused across sessions, gives the same estimate.
    assert gw.capacity() == (2, 2.0)
    assert gw.eta_s(20, gw.capacity()) == gw.eta_s(20) == (20 // 2 + 1) * 2.0


def test_each_model_has_its_own_queue_and_workers() -> None:
    gw = Gateway(Config(worker_heartbeat_s=1.0))
    gw._on_worker(_beat("a", avg=2.0))
    gw._on_worker(_beat("b", avg=2.0))
    gw._on_worker(_beat("c", avg=6.0, model="base"))
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
    gw = Gateway(Config(worker_heartbeat_s=1.0, bulk_every=4))
    gw._on_worker(_beat("a", avg=1.0))
    gw.lanes = {
        ("tiny.en-q8_0", "interactive"): LaneStats(100, 0, 0),
        ("tiny.en-q8_0", "bulk"): LaneStats(1, 0, 0),
    }
    # 1 bulk job ahead; 3 interactive jobs per bulk job: 1 + 3 * 2 ahead, not all 100.
    assert gw.backlog_eta_s(lane="bulk") == (1 + 6 + 1) * 1.0
    strict = Gateway(Config(worker_heartbeat_s=1.0, bulk_every=0))
    strict._on_worker(_beat("a", avg=1.0))
    strict.lanes = gw.lanes
    assert strict.backlog_eta_s(lane="bulk") == (1 + 100 + 1) * 1.0


async def test_a_lost_nats_connection_ends_waiting_sessions_and_fails_healthz() -> None:
    import trio

    from katydid.errors import ErrorCode, ProtocolError
    from katydid.gateway import Session
    from katydid.protocol import ServerProtocol

    gw = Gateway(Config())
    channels = [trio.open_memory_channel[object](8) for _ in range(2)]
    waiting, idle = (
        Session(ServerProtocol(f"s{i}"), send, recv, trio.Semaphore(4))  # type: ignore[arg-type]
        for i, (send, recv) in enumerate(channels)
    )
    waiting.stream_seqs[0] = 17  # one job out, its result not yet back
    gw.sessions = {"s0": waiting, "s1": idle}
    assert gw.routes()["/healthz"]().status == 200
    gw.bridge.lost = True  # what the bridge sets when nats-py closed its connection for good
    gw._on_nats_lost()
    told = channels[0][1].receive_nowait()
    assert isinstance(told, ProtocolError)
    assert told.code is ErrorCode.OVERLOADED
    assert told.retry_after_s == 5.0
    with pytest.raises(trio.WouldBlock):
        channels[1][1].receive_nowait()  # a session with nothing in flight has nothing to lose
    health = gw.routes()["/healthz"]()
    assert health.status == 503
    assert json.loads(health.body)["nats"] == "closed, being replaced"


def test_the_protocol_error_is_found_however_nested() -> None:
    from katydid.errors import ErrorCode, ProtocolError
    from katydid.gateway import _first

    wanted = ProtocolError(ErrorCode.UNSUPPORTED_AUDIO, "not audio")
    # A session's reader nursery inside its handler nursery: a group within a group.
    nested = ExceptionGroup("handler", [ExceptionGroup("reader", [wanted])])
    assert _first(nested, ProtocolError) is wanted
    with pytest.raises(LookupError):
        _first(ExceptionGroup("other", [ValueError()]), ProtocolError)


def test_readyz_waits_for_every_configured_model() -> None:
    gw = Gateway(Config(worker_heartbeat_s=1.0, worker_models="tiny.en-q8_0=2,base-q8_0=1"))
    gw._on_worker(_beat("a"))
    ready, detail = gw.readiness()
    assert not ready
    assert detail["models_served"] is False
    assert detail["models_missing"] == ["base-q8_0"]
    gw._on_worker(_beat("b", model="base-q8_0"))
    assert gw.readiness()[1]["models_served"] is True


def test_a_heartbeat_with_an_unroutable_model_name_is_refused() -> None:
    # Anything on NATS can publish a heartbeat; a name no subject can hold would make every
    # queue poll (one consumer request per offered model) fail.
    gw = Gateway(Config(worker_heartbeat_s=1.0))
    gw._on_worker(_beat("a", model="tiny model/../x"))
    gw._on_worker(_beat("b", model="base.en"))
    assert set(gw.workers) == {"b"}
    assert set(gw.offers()) == {"base.en"}
