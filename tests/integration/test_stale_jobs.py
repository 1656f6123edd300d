"""`katydid serve` purges what its embedded JetStream store kept from the last run: those jobs'
gateway and clients are gone. Checked against a real nats-server with a persisted store."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from katydid.bus.nats_admin import purge_jobs
from katydid.bus.nats_connection import connect
from katydid.bus.nats_stream import delete_job, ensure_stream
from katydid.config import DEFAULT_MODEL, Config
from katydid.embedded_nats import nats_server_binary, nats_server_config
from katydid.messages import lane_subject
from katydid.ports import free_ports
from tests.integration.stack import free_port, port_open, wait_until

pytestmark = pytest.mark.integration


def _start_nats(store: Path, port: int) -> subprocess.Popen[bytes]:
    conf = store.parent / "nats.conf"
    conf.write_text(
        nats_server_config(store, port, free_ports(1, avoid=(port,))[0]), encoding="utf-8"
    )
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_until(lambda: port_open(port), 10, "nats-server")
    return proc


def test_jobs_kept_across_a_restart_are_purged(tmp_path: Path) -> None:
    port = free_port()
    cfg = Config(nats_url=f"nats://127.0.0.1:{port}")

    async def queue_three_jobs() -> None:
        nc = await connect(cfg, "test")
        try:
            js = nc.jetstream()
            await ensure_stream(js, cfg)
            for i in range(3):
                await js.publish(
                    lane_subject(DEFAULT_MODEL, "interactive"), b"\0\0" * 160, headers={"n": str(i)}
                )
        finally:
            await nc.close()

    nats = _start_nats(tmp_path / "js", port)
    try:
        asyncio.run(queue_three_jobs())
    finally:
        nats.kill()  # as if serve died: the store keeps the jobs
        nats.wait()
    nats = _start_nats(tmp_path / "js", port)
    try:
        assert purge_jobs(cfg) == 3
        assert purge_jobs(cfg) == 0
    finally:
        nats.terminate()
        nats.wait()


def test_purge_without_a_stream_is_a_no_op(tmp_path: Path) -> None:
    port = free_port()
    nats = _start_nats(tmp_path / "js", port)
    try:
        assert purge_jobs(Config(nats_url=f"nats://127.0.0.1:{port}")) == 0
    finally:
        nats.terminate()
        nats.wait()


def test_deleting_a_job_already_gone_says_so(tmp_path: Path) -> None:
    # Gateways delete jobs that may have just been acked (a worker answered 'cancelled') or
    # deleted by another gateway: that is "already gone", not an error.
    port = free_port()
    cfg = Config(nats_url=f"nats://127.0.0.1:{port}")

    async def check() -> list[bool]:
        nc = await connect(cfg, "test")
        try:
            js = nc.jetstream()
            await ensure_stream(js, cfg)
            seqs = [
                (await js.publish(lane_subject(DEFAULT_MODEL, "bulk"), b"\0\0" * 160)).seq
                for _ in range(3)
            ]
            return [
                await delete_job(js, seqs[1]),
                await delete_job(js, seqs[1]),  # gone from the middle of the stream
                await delete_job(js, seqs[0]),
                await delete_job(js, seqs[0]),  # gone from before its first sequence
            ]
        finally:
            await nc.close()

    nats = _start_nats(tmp_path / "js", port)
    try:
        assert asyncio.run(check()) == [True, False, True, False]
    finally:
        nats.terminate()
        nats.wait()
