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
        assert window.waits == 2  # the second waits in line, behind the first
        first.release()  # room for both: "big" first, "small" behind it
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(order) == ["big", "small"]
        assert window.used == 60
    assert window.used == 0
    assert window.peak == 60


async def test_room_given_back_goes_to_the_takers_in_line_at_once(autojump_clock: Any) -> None:
    # In a storm the line is thousands long: room is handed over when it is given back, to as
    # many takers at the front as it fits, not one a pass of the scheduler as each next runs.
    window = ByteWindow(100)
    first = await window.take(100)
    admitted: list[int] = []

    async def taker(i: int, n: int) -> None:
        with await window.take(n):
            admitted.append(i)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        for i, n in enumerate((30, 30, 30, 30, 5)):
            nursery.start_soon(taker, i, n)
            await trio.testing.wait_all_tasks_blocked()
        assert window.waiting == 5
        first.release()
        # Nothing has run yet: the first three hold their bytes already; the fourth does not
        # fit, and the fifth, which would, waits behind it (first come, first served).
        assert window.used == 90
        assert window.waiting == 2
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(admitted) == [0, 1, 2]  # (trio runs a batch in any order)
    assert sorted(admitted[3:]) == [3, 4]
    assert window.used == 0
    assert window.peak == 100


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
    # A session that ends while it waits (its client left) gives up its place, at the front of
    # the line or behind others; the others are served.
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
        scopes["a"].cancel()  # first in line
        scopes["c"].cancel()  # behind another
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        first.release()
    assert sorted(order) == ["b", "d"]  # admitted together, run in any order
    assert window.used == 0
    with trio.fail_after(1):
        assert (await window.take(100)).bytes == 100  # nobody is left in line


async def test_a_cancelled_taker_at_the_front_lets_those_that_fit_behind_it_in() -> None:
    window = ByteWindow(100)
    first = await window.take(50)
    scopes: dict[str, trio.CancelScope] = {}
    admitted: list[str] = []

    async def taker(name: str, n: int) -> None:
        with trio.CancelScope() as scopes[name], await window.take(n):
            admitted.append(name)
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker, "big", 80)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(taker, "small", 40)
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == []
        scopes["big"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == ["small"]
        assert window.used == 90
        nursery.cancel_scope.cancel()
    first.release()
    assert window.used == 0
