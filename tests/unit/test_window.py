"""The gateway-wide window of uploaded audio being decoded and published (gateway/window.py)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from katydid.gateway.window import ByteWindow


async def test_takers_wait_for_room_first_come_first_served(autojump_clock: Any) -> None:
    window = ByteWindow(100)
    first = await window.take(60)
    order: list[str] = []

    async def taker(name: str, n: int) -> None:
        with await window.take(n):
            order.append(name)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker, "big", 50)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(taker, "small", 10)  # would fit now, but arrived second
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        assert window.used == 60
        assert window.waits == 1
        first.release()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["big", "small"]
        assert window.used == 60
    assert window.used == 0
    assert window.peak == 60


async def test_a_take_over_the_capacity_takes_the_whole_window(autojump_clock: Any) -> None:
    window = ByteWindow(100)
    with await window.take(10_000) as hold:
        assert hold.bytes == 100
        assert window.used == 100
    assert window.used == 0


async def test_release_is_idempotent(autojump_clock: Any) -> None:
    window = ByteWindow(100)
    hold = await window.take(40)
    hold.release()
    hold.release()  # the driver's context exit after a tenant's early release
    assert window.used == 0


def test_a_window_needs_capacity() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ByteWindow(0)


async def test_takers_cancelled_while_waiting_leave_the_line_in_order(autojump_clock: Any) -> None:
    # A session that ends while it waits (its client left) gives up its place, whether it held
    # the turn (waiting for room) or stood in line for it; the others are served in order.
    window = ByteWindow(100)
    first = await window.take(100)
    order: list[str] = []
    scopes: dict[str, trio.CancelScope] = {}

    async def taker(name: str, n: int) -> None:
        with trio.CancelScope() as scopes[name]:
            hold = await window.take(n)
            order.append(name)
            hold.release()

    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c", "d"):
            nursery.start_soon(taker, name, 30)
            await trio.testing.wait_all_tasks_blocked()
        scopes["a"].cancel()  # held the turn
        scopes["c"].cancel()  # in line
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        first.release()
    assert order == ["b", "d"]
    assert window.used == 0
    with trio.fail_after(1):
        assert (await window.take(100)).bytes == 100  # the turn is free again
