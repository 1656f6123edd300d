"""Parked readers (``gateway/parking.py``): woken once, by their socket or their deadline, and out
of the epoll set whatever ended the wait; the waking task lives only while something is parked.
The door's use of it (a waiting session parked, a client leaving while parked, shutdown) is
tested in ``test_gateway_flow.py`` over socket pairs."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request, TextMessage

from katydid.gateway.parking import Parking, Wake
from katydid.gateway.ws_handshake import accept


@asynccontextmanager
async def pairs(n: int) -> AsyncIterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(n)]
    try:
        yield made
    finally:
        for a, b in made:
            a.close()
            b.close()


async def test_a_reader_wakes_when_its_socket_is_readable_and_leaves_the_set() -> None:
    async with pairs(2) as [(ours, theirs), (other, _)], trio.open_nursery() as nursery:
        parking = Parking(nursery)
        woke: dict[int, Wake] = {}

        async def reader(sock: socket.socket) -> None:
            waiting = parking.park(sock.fileno(), trio.current_time() + 3600)
            assert waiting is not None
            woke[sock.fileno()] = await waiting

        nursery.start_soon(reader, ours)
        nursery.start_soon(reader, other)
        await trio.testing.wait_all_tasks_blocked()
        assert parking.parked == 2
        theirs.send(b"x")
        with trio.fail_after(5):
            while ours.fileno() not in woke:  # noqa: ASYNC110 - woken by the parking task
                await trio.sleep(0.01)
        assert woke == {ours.fileno(): Wake.READABLE}  # the other one sleeps on
        assert parking.parked == 1
        nursery.cancel_scope.cancel()
    assert parking.parked == 0


async def test_a_peer_that_closes_wakes_its_reader() -> None:
    async with pairs(1) as [(ours, theirs)], trio.open_nursery() as nursery:
        parking = Parking(nursery)
        waiting = parking.park(ours.fileno(), trio.current_time() + 3600)
        assert waiting is not None
        theirs.close()
        with trio.fail_after(5):
            assert await waiting is Wake.READABLE
        assert ours.recv(10) == b""  # what the reader then reads: the end


async def test_a_reader_wakes_at_its_deadline_in_deadline_order(autojump_clock: Any) -> None:
    async with pairs(3) as made:
        fds = [ours.fileno() for ours, _ in made]
        woke: list[tuple[float, int]] = []
        async with trio.open_nursery() as nursery:
            parking = Parking(nursery)
            start = trio.current_time()

            async def reader(fd: int, after_s: float) -> None:
                waiting = parking.park(fd, start + after_s)
                assert waiting is not None
                assert await waiting is Wake.DEADLINE
                woke.append((trio.current_time() - start, fd))

            # Parked latest first: each earlier deadline must shorten the task's wait.
            for fd, after_s in zip(fds, (300.0, 20.0, 5.0), strict=True):
                nursery.start_soon(reader, fd, after_s)
                await trio.testing.wait_all_tasks_blocked()
        assert [fd for _, fd in woke] == fds[::-1]
        assert [t for t, _ in woke] == pytest.approx([5.0, 20.0, 300.0])
        assert parking.parked == 0


async def test_a_cancelled_reader_leaves_the_set_and_the_task_ends_with_the_last() -> None:
    async with pairs(1) as [(ours, _)]:
        with trio.fail_after(5):  # the nursery does not wait 3,600 s on the parking task
            async with trio.open_nursery() as nursery:
                parking = Parking(nursery)
                with trio.move_on_after(0.05) as scope:  # a session's end, say
                    waiting = parking.park(ours.fileno(), trio.current_time() + 3600)
                    assert waiting is not None
                    await waiting
                assert scope.cancelled_caught
                assert parking.parked == 0
        async with trio.open_nursery() as nursery:
            parking = Parking(nursery)
            # Out of the set: it parks again (a set refuses a socket it holds).
            again = parking.park(ours.fileno(), trio.current_time() + 0.01)
            assert again is not None
            assert parking.park(ours.fileno(), trio.current_time() + 0.01) is None
            assert await again is Wake.DEADLINE


async def test_deadlines_of_readers_woken_early_do_not_pile_up(autojump_clock: Any) -> None:
    # A session pinged every 20 s for hours parks again after each ping, each time with a
    # deadline hours away: the stale ones are dropped, not kept until they pass.
    async with pairs(1) as [(ours, theirs)], trio.open_nursery() as nursery:
        parking = Parking(nursery)
        for _ in range(1000):
            waiting = parking.park(ours.fileno(), trio.current_time() + 86_400)
            assert waiting is not None
            theirs.send(b"p")
            assert await waiting is Wake.READABLE
            assert ours.recv(10) == b"p"
        assert len(parking._deadlines) <= 64 + 2


async def test_a_websocket_parks_only_when_its_next_message_needs_a_read() -> None:
    ours, theirs = trio.socket.socketpair()
    client, server = trio.SocketStream(theirs), trio.SocketStream(ours)
    peer = WSConnection(ConnectionType.CLIENT)
    async with client, server, trio.open_nursery() as nursery:
        await client.send_all(peer.send(Request(host="katydid.test", target="/")))
        ws = await accept(server, max_message=1000, timeout_s=5, send_timeout_s=5)
        assert ws is not None
        assert ws.parkable() is None  # what came with the handshake is not handled yet
        peer.receive_data(bytes(await client.receive_some()))
        # Two messages in one write: the server reads both at once.
        await client.send_all(peer.send(TextMessage("one")) + peer.send(TextMessage("two")))
        assert await ws.get_message() == "one"
        assert ws.parkable() is None  # "two" was read with it: no read needed for it
        assert await ws.get_message() == "two"
        fd = ws.parkable()
        assert fd == ours.fileno()
        parking = Parking(nursery)
        waiting = parking.park(fd, trio.current_time() + 3600)
        assert waiting is not None
        await client.send_all(peer.send(TextMessage("three")))
        with trio.fail_after(5):
            assert await waiting is Wake.READABLE
        assert await ws.get_message() == "three"


async def test_a_tls_stream_is_never_parked() -> None:
    # A readable socket under TLS need not hold a whole record (or any data, after a
    # renegotiation): only a plain socket stream parks.
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = WSConnection(ConnectionType.CLIENT)
    async with trio.open_nursery():
        await client_stream.send_all(peer.send(Request(host="katydid.test", target="/")))
        ws = await accept(server_stream, max_message=1000, timeout_s=5, send_timeout_s=5)
        assert ws is not None
        peer.receive_data(bytes(await client_stream.receive_some()))
        await client_stream.send_all(peer.send(TextMessage("one")))
        assert await ws.get_message() == "one"
        assert ws.parkable() is None
