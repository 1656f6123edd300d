"""A worker's check of a job's session before engine time (katydid_worker.liveness): only a
missing or ended record orphans a job; no bucket or a failed read transcribes it; one read per
session per second; and the orphaned count reaches the heartbeat, the metrics and accounts."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import nats.errors
import pytest
from prometheus_client import generate_latest

from katydid.bus.accounts import PERMISSIONS, worker_permissions
from katydid.cli_servers import _status_table
from katydid.config import Config
from katydid.gateway.outputs import error_code
from katydid.log import SampledLogger
from katydid.messages import Job, ResultError
from katydid.metrics import GatewayMetrics
from katydid_worker.audience import Audience
from katydid_worker.liveness import Liveness, SessionLiveness, direct_get_subject, verdict
from katydid_worker.worker_stats import WorkerStats

SESSION = "0123456789abcdef0123456789abcdef"
RECORD = {"Nats-Stream": "KV_KATYDID_SESSIONS", "Nats-Sequence": "7"}


class FakeNats:
    """Answers direct gets from a script: headers per call, or an exception to raise."""

    def __init__(self, *answers: dict[str, str] | Exception) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, float]] = []

    async def request(self, subject: str, timeout_s: float) -> Any:
        self.asked.append((subject, timeout_s))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return SimpleNamespace(headers=answer or None, data=b"{}")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (RECORD, Liveness.LIVE),
        (None, Liveness.LIVE),  # a record without headers (another server's form): live
        ({"Status": "404", "Description": "Message Not Found"}, Liveness.ORPHANED),
        (RECORD | {"KV-Operation": "DEL"}, Liveness.ORPHANED),
        (RECORD | {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}, Liveness.ORPHANED),
        ({"Status": "408", "Description": "Request Timeout"}, Liveness.UNCHECKED),
        ({"Status": "400"}, Liveness.UNCHECKED),
    ],
)
def test_verdict_of_a_direct_get(headers: dict[str, str] | None, expected: Liveness) -> None:
    assert verdict(headers)[0] == expected


def test_the_subject_is_one_key_of_the_sessions_bucket() -> None:
    assert direct_get_subject(SESSION) == (
        f"$JS.API.DIRECT.GET.KV_KATYDID_SESSIONS.$KV.KATYDID_SESSIONS.{SESSION}"
    )


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (nats.errors.NoRespondersError(), Liveness.NO_BUCKET),
        (nats.errors.TimeoutError(), Liveness.UNCHECKED),
        (nats.errors.ConnectionClosedError(), Liveness.UNCHECKED),
        (OSError("reset"), Liveness.UNCHECKED),
    ],
)
async def test_a_read_that_fails_never_orphans(answer: Exception, expected: Liveness) -> None:
    fake = FakeNats(answer)
    check = await SessionLiveness(fake.request, 0.5).check(SESSION)
    assert check.liveness == expected
    assert check.liveness != Liveness.ORPHANED
    assert fake.asked == [(direct_get_subject(SESSION), 0.5)]


async def test_a_session_id_that_is_not_a_key_is_not_asked_for() -> None:
    fake = FakeNats(RECORD)
    for bad in ("a.b", "a*", ">", "", "a b"):
        assert (await SessionLiveness(fake.request, 1).check(bad)).liveness == Liveness.UNCHECKED
    assert fake.asked == []


async def test_one_read_per_session_per_ttl() -> None:
    clock = Clock()
    fake = FakeNats({"Status": "404"}, RECORD)
    live = SessionLiveness(fake.request, 1.0, ttl_s=1.0, clock=clock)
    first = await live.check(SESSION)
    assert (first.liveness, first.cached) == (Liveness.ORPHANED, False)
    clock.now += 0.9  # a long file's burst of chunks: answered from memory
    for _ in range(20):
        again = await live.check(SESSION)
        assert (again.liveness, again.cached) == (Liveness.ORPHANED, True)
    assert len(fake.asked) == 1
    clock.now += 0.2  # past the ttl: read again (the record came back, say)
    assert (await live.check(SESSION)).liveness == Liveness.LIVE
    assert len(fake.asked) == 2


async def test_a_record_not_written_for_the_window_is_an_orphans_even_if_still_stored() -> None:
    # JetStream removes an expired entry a moment after its age passes: the worker judges the
    # age itself, when it uses the verdict (a remembered one too).
    wall = Clock()
    wall.now = 1_000_000.0
    record = {
        "session_id": SESSION, "state": "detached", "gateway": "g", "model": "m",
        "options": {}, "updated_unix": wall.now - 110.0,
    }  # fmt: skip

    async def request(_subject: str, _timeout_s: float) -> Any:
        return SimpleNamespace(headers=RECORD, data=json.dumps(record).encode())

    live = SessionLiveness(request, 1.0, ttl_s=1.0, window_s=120.0, wall_clock=wall)
    assert (await live.check(SESSION)).liveness == Liveness.LIVE
    wall.now += 10.5  # the remembered verdict, used after the window: orphaned
    late = await live.check(SESSION)
    assert (late.liveness, late.cached) == (Liveness.ORPHANED, True)
    assert "past the 120 s window" in late.why
    # Without a window (a deployment that does not say), age alone orphans nothing
    plain = SessionLiveness(request, 1.0, wall_clock=wall)
    assert (await plain.check(SESSION)).liveness == Liveness.LIVE


async def test_a_failure_is_remembered_too_and_memory_is_bounded() -> None:
    clock = Clock()
    fake = FakeNats(nats.errors.TimeoutError())
    live = SessionLiveness(fake.request, 1.0, max_sessions=3, clock=clock)
    for _ in range(5):  # NATS slow: one timeout for the burst, not one per chunk
        assert (await live.check(SESSION)).liveness == Liveness.UNCHECKED
    assert len(fake.asked) == 1
    for i in range(10):
        await live.check(f"s{i}")
    assert len(live._seen) == 3
    assert list(live._seen) == ["s7", "s8", "s9"]  # the oldest forgotten first


def test_orphaned_is_a_skip_counted_in_the_heartbeat_and_the_metrics() -> None:
    assert ResultError.ORPHANED.skipped
    assert ResultError("orphaned") is ResultError.ORPHANED
    error_code("orphaned")  # the gateway maps it to a client code (does not raise)
    stats = WorkerStats("w1", "tiny.en")
    stats.jobs_skipped = stats.jobs_orphaned = 3
    beat = json.loads(stats.to_json())
    assert beat["jobs_orphaned"] == 3
    metrics = GatewayMetrics(lambda: {"w1": beat})
    text = generate_latest(metrics.registry).decode()
    assert 'katydid_jobs_orphaned_total{worker="w1"} 3.0' in text
    assert 'katydid_worker_jobs_total{outcome="skipped",worker="w1"} 3.0' in text


def test_roles_may_read_and_write_what_resumption_needs() -> None:
    worker = worker_permissions("host1")["publish"]["allow"]
    assert "katydid.results.*.*.host1" in worker
    assert "$JS.API.DIRECT.GET.KV_KATYDID_SESSIONS.$KV.KATYDID_SESSIONS.*" in worker
    # Nothing else of JetStream's KV or message reads.
    kv = [s for s in worker if "KV" in s or "MSG.GET" in s or "DIRECT" in s]
    assert kv == ["$JS.API.DIRECT.GET.KV_KATYDID_SESSIONS.$KV.KATYDID_SESSIONS.*"]
    gateway = PERMISSIONS["gateway"]
    assert "$KV.KATYDID_SESSIONS.>" in gateway["publish"]["allow"]
    assert "katydid.results.>" in gateway["subscribe"]["allow"]


def test_why_a_job_is_orphaned() -> None:
    assert verdict({"Status": "404"}) == (Liveness.ORPHANED, "no record")
    assert verdict(RECORD | {"KV-Operation": "DEL"}) == (Liveness.ORPHANED, "record deleted")
    assert verdict(RECORD | {"KV-Operation": "PURGE"}) == (Liveness.ORPHANED, "record purged")


def test_nats_status_table_shows_resumption_when_there() -> None:
    stream = {"name": "J", "messages": 0, "bytes": 0, "max_msgs": 1, "max_bytes": 1}
    worker = {"id": "w1", "model": "m", "busy": False, "jobs_done": 3, "rtf": None}
    base: dict[str, Any] = {
        "stream": stream | {"max_msg_size": 1},
        "consumers": [],
        "workers": [worker | {"jobs_orphaned": 2}],
        "listened_s": 1.0,
    }
    without = _status_table(base | {"sessions": None, "results": None})
    assert "KATYDID_SESSIONS" not in without
    assert without.splitlines()[-2].split()[-1] == "orphaned"  # the workers' header
    assert without.splitlines()[-1].split()[-1] == "2"
    sessions = {"bucket": "KATYDID_SESSIONS", "records": 4, "entries": 6, "allow_direct": False}
    results = {"name": "KATYDID_RESULTS", "messages": 9, "bytes": 900, "max_bytes": 1000}
    table = _status_table(
        base
        | {
            "sessions": sessions | {"why": ""},
            "results": results | {"max_age_s": 120.0, "why": ""},
        }
    )
    assert "bucket KATYDID_SESSIONS: 4 resumable sessions" in table
    assert "workers cannot check sessions" in table
    assert "stream KATYDID_RESULTS: 9 results, 900 bytes" in table


async def test_with_resumption_off_no_job_is_checked_nor_set_aside() -> None:
    # resume_window_s 0: gateways write no records, so a bucket left from a run with it on
    # would make every job look orphaned; nothing is asked.
    asked: list[str] = []

    async def request(subject: str, _timeout_s: float) -> Any:
        asked.append(subject)
        return SimpleNamespace(headers={"Status": "404"}, data=b"")

    cfg = Config(resume_window_s=0)
    audience = Audience(cfg, "w", request, SampledLogger(SimpleNamespace()))
    job = Job(SESSION + "-0", SESSION, 0, 0, "katydid.results.g." + SESSION, 2**40)
    assert await audience.orphaned(job) is None
    assert await audience.waits_for_client(job) is None
    assert asked == []
