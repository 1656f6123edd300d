"""serve's watch over its nats-server's store: a write error in its stderr is noticed (even split
over two reads), the stream bound fits the disk, and "room again" means room."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from katydid.config import Config
from katydid.embedded_nats import StoreFault, relay_stderr, sized_stream, store_has_room
from katydid.session_record import GATEWAYS_BYTES

Usage = namedtuple("Usage", "total used free")


async def test_a_store_write_error_is_noticed_and_relayed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    send, receive = trio.testing.memory_stream_pair()
    fault = StoreFault()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay_stderr, receive, fault)
        await send.send_all(b"[1] 2026/12/07 10:31:37.493 [INF] Server is ready\n[1] [WRN] slow")
        await send.send_all(b" consumer\n")
        await trio.testing.wait_all_tasks_blocked()
        assert fault.since is None
        await send.send_all(b"[1] [ERR] Filestore [KATYDID_JOBS] Critical wr")
        await send.send_all(b"ite error: write 2.blk: no space left on device\n")
        await send.aclose()
    assert fault.since is not None
    relayed = capsys.readouterr().err
    assert "Server is ready" not in relayed  # its banner and info lines stay out of serve's log
    assert "[WRN] slow consumer\n" in relayed
    assert "Critical write error" in relayed


def test_the_stream_bound_fits_the_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(100, 80, 20_000_000))
    small = sized_stream(Config(), tmp_path / "nats")
    # 60% (nats-server takes 75% of the free disk) for every stream together, as JetStream
    # reserves each one's bound: the jobs, the results, the sessions' and the gateways' buckets
    bounds = (small.stream_max_bytes, small.results_max_bytes, small.sessions_max_bytes)
    assert sum(bounds) + GATEWAYS_BYTES <= 12_000_000
    assert sum(bounds) + GATEWAYS_BYTES > 11_900_000  # no more lowered than needed
    default = Config()
    assert small.stream_max_bytes / small.results_max_bytes == pytest.approx(
        default.stream_max_bytes / default.results_max_bytes, rel=0.01
    )  # each in proportion
    roomy = Config(stream_max_bytes=5_000_000, results_max_bytes=10**6, sessions_max_bytes=10**6)
    assert sized_stream(roomy, tmp_path / "nats") is roomy


def test_room_again_is_a_tenth_of_the_disk_or_64_mib(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    usage: dict[str, Any] = {"u": Usage(24_000_000, 23_000_000, 1_000_000)}
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage["u"])
    assert not store_has_room(tmp_path)
    usage["u"] = Usage(24_000_000, 20_000_000, 4_000_000)
    assert store_has_room(tmp_path)
    usage["u"] = Usage(10**12, 10**12 - 10**8, 10**8)  # 100 MB free of 1 TB
    assert store_has_room(tmp_path)
