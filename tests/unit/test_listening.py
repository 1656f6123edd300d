"""The accept loop: a storm's connections are taken when the listener wakes, not one per pass."""

from __future__ import annotations

import socket
import ssl
from functools import partial

import pytest
import structlog
import trio
import trio.testing

from katydid.gateway.listening import accept_forever, tls
from katydid.log import SampledLogger

# Connected before anything accepts: under every kernel's default accept queue (somaxconn 4,096
# since Linux 5.4, 128 before), where a further connect would wait for its SYN to be retried.
WAITING = 100


@pytest.mark.parametrize("door", ["plain", "tls"])
async def test_connections_waiting_in_the_kernel_are_taken_in_a_few_passes(door: str) -> None:
    """100 connections wait in the accept queue; the accept loop takes all of them within a few
    scheduler passes (counted by a task that yields once a pass). trio's own ``accept`` takes
    one a pass: 100 passes, while in a storm each pass runs thousands of tasks. A TLS door
    too: each is served as a TLS stream (the TLS handshake is then the handler's)."""
    wrap = tls(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)) if door == "tls" else None
    expected = trio.SSLStream if door == "tls" else trio.SocketStream
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(WAITING)]
    served: list[int] = []
    all_served = trio.Event()
    passes = 0

    async def handler(stream: trio.abc.Stream) -> None:
        assert isinstance(stream, expected)
        served.append(passes)
        if len(served) == WAITING:
            all_served.set()
        await trio.aclose_forcefully(stream)

    async def count_passes() -> None:
        nonlocal passes
        while True:
            passes += 1
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_passes)
            nursery.start_soon(
                partial(
                    accept_forever,
                    listener,
                    nursery,
                    handler,
                    SampledLogger(structlog.get_logger()),
                    wrap=wrap,
                )
            )
            with trio.fail_after(10):
                await all_served.wait()
            nursery.cancel_scope.cancel()
    finally:
        for c in clients:
            c.close()
    assert served[-1] - served[0] <= 3, (served[0], served[-1])


async def test_the_port_stops_listening_when_the_accept_loop_ends() -> None:
    """The loop's second handle on the listening socket is closed with it: a port that went on
    listening would take clients that nobody ever accepts (with SO_REUSEPORT, clients the other
    gateways should have had)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            accept_forever,
            listener,
            nursery,
            trio.SocketStream.aclose,
            SampledLogger(structlog.get_logger()),
        )
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    probe = socket.socket()
    try:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        probe.close()
