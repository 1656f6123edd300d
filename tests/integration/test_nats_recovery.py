"""The gateway's NATS bridge replaces a connection that nats-py closed for good (a server error
such as a message over max_payload: nats-py does not reconnect after that), tells the gateway,
and works again: one message must never cut the gateway off from NATS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nats
import pytest
import trio

from katydid.bus import BusHandlers
from katydid.bus.nats_bridge import NatsBridge
from katydid.config import DEFAULT_MODEL, Config
from katydid.errors import NatsError
from katydid.messages import lane_subject
from tests.integration.stack import free_port
from tests.integration.test_stale_jobs import _start_nats

pytestmark = pytest.mark.integration


async def _until(predicate: Callable[[], object], timeout_s: float) -> None:
    """Poll state the bridge's tasks and threads set, bounded (no event exposes it)."""
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_a_connection_closed_for_good_is_replaced(tmp_path: Path) -> None:
    port = free_port()
    server = _start_nats(tmp_path / "js", port)
    cfg = Config(nats_url=f"nats://127.0.0.1:{port}")
    results: list[bytes] = []
    lost: list[bool] = []
    bridge = NatsBridge(cfg, "g1")
    bridge.attach(
        BusHandlers(
            on_result=lambda data, _sender: results.append(data),
            on_worker=lambda _: None,
            on_dead_job=lambda *_: None,
            on_lost=lambda: lost.append(True),
        )
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(bridge.run)
            assert bridge.connected
            # Headers over the server's max_payload (4 MB): nats-py checks only the body, the server
            # answers "maximum payload exceeded" and closes the connection.
            huge = {"h": "x" * (5 * 1024 * 1024)}
            try:
                await bridge._call(lambda: bridge._nc.publish("katydid.test", b"", headers=huge))
            except NatsError:
                pass  # refused at once or not: the connection is what matters
            await _until(lambda: bridge.lost or bridge.replacements, 10)
            await _until(lambda: bridge.replacements == 1 and not bridge.lost, 30)
            assert lost == [True]
            assert bridge.connected
            # The new connection is subscribed: a result reaches the gateway again.
            nc = await trio.to_thread.run_sync(_publish_result, cfg.nats_url)
            assert nc
            await _until(lambda: results == [b"{}"], 10)
            nursery.cancel_scope.cancel()
    finally:
        server.terminate()
        server.wait()


def _publish_result(url: str) -> bool:
    import asyncio

    async def go() -> bool:
        nc = await nats.connect(url)
        try:
            await nc.publish("katydid.results.g1.s0.w0", b"{}")  # <gateway>.<session>.<user>
            await nc.flush()
        finally:
            await nc.close()
        return True

    return asyncio.run(go())


async def test_a_reconnect_is_reported_and_a_job_s_place_in_the_stream_is_known(
    tmp_path: Path,
) -> None:
    # What the gateway needs to find results lost while it reconnected: the reconnect itself,
    # and whether a job is still in the stream (not yet acked) or gone.
    port = free_port()
    server = _start_nats(tmp_path / "js", port)
    cfg = Config(nats_url=f"nats://127.0.0.1:{port}")
    reconnects: list[bool] = []
    bridge = NatsBridge(cfg, "g1")
    bridge.attach(
        BusHandlers(
            on_result=lambda _data, _sender: None,
            on_worker=lambda _: None,
            on_dead_job=lambda *_: None,
            on_lost=lambda: None,
            on_reconnected=lambda: reconnects.append(True),
        )
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(bridge.run)

            async def queue_one() -> int:
                ack = await bridge._js.publish(
                    lane_subject(DEFAULT_MODEL, "interactive"), b"\0\0" * 160
                )
                return int(ack.seq)

            seq = await bridge._call(queue_one)
            assert await bridge.job_in_stream(seq)
            assert await bridge.delete_job(seq)
            assert not await bridge.job_in_stream(seq)
            assert not await bridge.job_in_stream(seq + 1000)  # never there
            server.terminate()
            server.wait()
            server = _start_nats(tmp_path / "js", port)
            await _until(lambda: reconnects, 30)
            assert bridge.connected
            nursery.cancel_scope.cancel()
    finally:
        server.terminate()
        server.wait()
