"""The keys file, key lookup, where doors find keys, and the per-key bookkeeping (quotas, fair
share) as plain code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from katydid.errors import ConfigError, ErrorCode, ProtocolError
from katydid.gateway.credentials import bearer, query_key
from katydid.gateway.native_wire import receive_text
from katydid.gateway.tenants import AudioBudget, Tenants
from katydid.keys import KeyFile, add_key, parse_keys, read_keys, revoke_key
from katydid.log import SampledLogger
from katydid.metrics import GatewayMetrics


def test_add_stores_only_a_hash_in_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    key = add_key(path, "alice", max_sessions=3, audio_s_per_hour=60.5, max_queued_jobs=2)
    assert key.startswith("kd_")
    assert len(key) > 40
    text = path.read_text()
    assert key not in text
    assert os.stat(path).st_mode & 0o777 == 0o600
    record = read_keys(path)["alice"]
    assert (record.max_sessions, record.audio_s_per_hour, record.max_queued_jobs) == (3, 60.5, 2)
    assert KeyFile(path).lookup(key) == record
    assert KeyFile(path).lookup(key + "x") is None
    with pytest.raises(ConfigError, match="exists already"):
        add_key(path, "alice")
    with pytest.raises(ConfigError, match="key name"):
        add_key(path, "../etc")
    with pytest.raises(ConfigError, match="max-sessions"):
        add_key(path, "bob", max_sessions=0)
    # Revoked, the name stays with the old key: said so (it said "revoke it first").
    revoke_key(path, "alice")
    with pytest.raises(ConfigError, match=r"was revoked .*pick another"):
        add_key(path, "alice")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("alice", "expected NAME SHA256 CREATED"),
        ("al/ice " + "0" * 64 + " 2026", "bad key name"),
        ("alice abc 2026", "SHA-256"),
        ("alice " + "0" * 64 + " 2026 max_sessions=two", "max_sessions must be a number"),
        ("alice " + "0" * 64 + " 2026 colour=red", "unknown field"),
        ("alice " + "0" * 64 + " 2026 max_sessions=-1", ">= 0"),
    ],
)
def test_a_bad_line_is_named(line: str, message: str) -> None:
    good = "bob " + "1" * 64 + " 2026-01-01T00:00:00Z"
    with pytest.raises(ConfigError, match=message) as err:
        parse_keys(f"# comment\n{good}\n\n{line}\n", "keys.txt")
    assert str(err.value).startswith("keys.txt:4:")


def test_a_name_twice_is_an_error() -> None:
    line = "bob " + "1" * 64 + " 2026"
    with pytest.raises(ConfigError, match=r"keys\.txt:2: key name 'bob' appears twice"):
        parse_keys(f"{line}\n{line}\n", "keys.txt")


def test_the_file_is_read_again_when_it_changes_and_a_bad_one_keeps_the_old_keys(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys"
    alice = add_key(path, "alice")
    keys = KeyFile(path, check_s=1.0)
    bob = add_key(path, "bob")
    assert keys.refresh(0.5) is None  # checked at most once a second
    assert keys.refresh(2.0) is True
    assert keys.lookup(bob) is not None
    revoke_key(path, "alice")
    assert keys.refresh(4.0) is True
    record = keys.lookup(alice)
    assert record is not None
    assert record.revoked is not None  # kept, so a refusal can name it
    path.write_text(path.read_text() + "garbage\n")
    assert keys.refresh(6.0) is False
    assert f"{path}:5: expected NAME" in (keys.last_error or "")
    assert keys.lookup(bob) is not None  # the keys loaded before stay in force
    assert keys.refresh(8.0) is None  # the same bad file is not re-read every second
    with pytest.raises(ConfigError, match=r"keys:\d+:"):
        KeyFile(path)  # at start, a bad file is an error


def test_a_missing_file_is_an_error_at_start_and_keeps_the_keys_while_serving(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys"
    with pytest.raises(ConfigError, match="does not exist"):
        KeyFile(path)  # a mistyped path would refuse everyone
    alice = add_key(path, "alice")
    keys = KeyFile(path)
    path.unlink()
    assert keys.refresh(10.0) is False
    assert "does not exist" in (keys.last_error or "")
    assert keys.lookup(alice) is not None
    path.write_text("")  # emptied on purpose: valid, no key left
    assert keys.refresh(20.0) is True
    assert keys.lookup(alice) is None
    assert keys.active_names == []


def test_oversized_and_empty_keys_are_unknown(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    add_key(path, "alice")
    keys = KeyFile(path)
    assert keys.lookup("") is None
    assert keys.lookup("x" * 100_000) is None


def test_where_doors_find_keys() -> None:
    assert bearer([(b"Host", b"x"), (b"Authorization", b"Bearer kd_abc")]) == "kd_abc"
    assert bearer([(b"authorization", b"bearer  kd_abc ")]) == "kd_abc"
    assert bearer([(b"Host", b"x")]) is None
    assert bearer([(b"Authorization", b"Basic dXNlcjpwYXNz")]) == ""
    assert bearer([(b"Authorization", b"Bearer " + b"x" * 10_000)]) == ""
    assert bearer([(b"Authorization", "Bearer kd_é".encode())]) == ""
    assert query_key("/vosk?api_key=kd_abc&x=1") == "kd_abc"
    assert query_key("/vosk") is None
    assert query_key("/vosk?x=1") is None


def test_the_audio_budget_counts_the_last_hour_by_minute() -> None:
    budget = AudioBudget()
    budget.add(30.0, 0.0)
    budget.add(30.0, 59.0)  # the same minute
    budget.add(40.0, 600.0)
    assert budget.used(600.0) == 100.0
    assert len(budget.buckets) == 2
    # Under a budget of 50 s again once the first minute ages out: at 3600 + 60 s.
    assert budget.retry_after_s(50.0, 700.0) == pytest.approx(3660.0 - 700.0)
    assert budget.used(3661.0) == 40.0


def _tenants(path: Path) -> Tenants:
    return Tenants(path, GatewayMetrics(dict), SampledLogger(_NullLog(), burst=5, window_s=10))


class _NullLog:
    def __getattr__(self, _: str) -> object:
        return lambda *a, **k: None


def test_authentication_and_quotas(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    key = add_key(path, "two", max_sessions=2, audio_s_per_hour=100)
    gone = add_key(path, "gone")
    revoke_key(path, "gone")
    tenants = _tenants(path)
    # The client hears "required" or "not valid"; only the log says a key was revoked.
    for presented, reason in ((None, "required"), ("kd_x", "not valid"), (gone, "not valid")):
        with pytest.raises(ProtocolError, match=reason) as refused:
            tenants.authenticate(presented, "websocket")
        assert refused.value.code is ErrorCode.UNAUTHORIZED
        assert refused.value.close_code == 4401
    tenant = tenants.authenticate(key, "websocket")
    tenants.open(tenant, 0.0)
    tenants.open(tenant, 0.0)
    with pytest.raises(ProtocolError) as over:
        tenants.open(tenant, 0.0)
    assert over.value.code is ErrorCode.QUOTA_EXCEEDED
    assert over.value.close_code == 4429
    assert over.value.retry_after_s
    tenants.close(tenant)
    tenants.charge(tenant, 100.0, 10.0)
    with pytest.raises(ProtocolError, match="used its 100 s") as spent:
        tenants.open(tenant, 20.0)
    assert spent.value.retry_after_s == pytest.approx(3660.0 - 20.0)
    tenants.open(tenant, 3700.0)  # an hour later


async def test_fair_share_seats_a_key_below_its_share(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    key = add_key(path, "batch", max_queued_jobs=2)
    tenants = _tenants(path)
    tenant = tenants.authenticate(key, "websocket")
    order: list[int] = []

    async def job(n: int) -> None:
        await tenants.seat(tenant)
        order.append(n)
        # Published: the job is now in the stream, counted by its session's recount.
        tenants.recount(tenant, 0, 1)
        tenants.unseat(tenant)

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(job, n)
        await trio.testing.wait_all_tasks_blocked()
        assert len(order) == 2  # two in the stream, three seated
        assert tenant.waiting == 3
        assert tenant.full
        tenants.recount(tenant, 1, 0)  # one answered
        await trio.testing.wait_all_tasks_blocked()
        assert len(order) == 3
        tenants.recount(tenant, 2, 0)  # a session with its two jobs ended
        await trio.testing.wait_all_tasks_blocked()
    assert sorted(order) == list(range(5))
    assert tenant.queued == 2


async def test_a_partial_skipped_at_the_keys_share_does_not_stop_the_next_one(
    tmp_path: Path,
) -> None:
    """A key at its share of the stream has its partials skipped; the session must hear so,
    or it would wait for that partial's answer for good and never send another."""
    from katydid.bus.memory import MemoryBus
    from katydid.config import Config
    from katydid.gateway.hub import Hub
    from katydid.gateway.outputs import Admit, Publish
    from tests.unit.test_session import _speech_like

    path = tmp_path / "keys"
    key = add_key(path, "batch", max_queued_jobs=1)
    cfg = Config(api_keys_file=str(path), chunk_min_s=5.0, partial_interval_s=1.0)
    bus = MemoryBus()
    gateway = Hub(cfg, bus=bus)
    gateway.admission.partials_allowed["tiny.en-q8_0"] = True
    live = gateway.open_session("websocket", key)
    s = live.session
    start = receive_text(s, '{"type": "start", "partials": true}', 0.0)
    (admit,) = start
    assert isinstance(admit, Admit)
    gateway.seating.admit(live, admit)
    assert live.tenant is not None
    live.tenant.queued = 1  # its one job in the stream: at its share
    second = _speech_like(1.0, pause_every_s=10.0)
    for _ in range(2):  # the second partial is built only if the first was let go
        out = s.receive_bytes(second, 0.0, partials_allowed=True)
        partials = [o for o in out if isinstance(o, Publish)]
        assert [p.job.options.kind for p in partials] == ["partial"]
        assert await gateway.seating.publish(live, partials[0]) == []
    assert bus.published == []  # skipped, not queued
    assert not s.closed
