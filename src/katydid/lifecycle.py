"""The one shutdown path of every long-running process (``serve``, ``gateway``, ``worker``).

hypercorn's ``worker_serve`` shape: the process serves; this races a signal against it. On the
first SIGINT/SIGTERM it says STOPPING=1 (systemd) and runs the process's ``drain`` (stop taking
work, finish what is in hand within a grace period); a second signal calls ``cut`` (the grace
ends now). The signal receiver stays open through the whole shutdown: a second Ctrl-C must never
reach Python's default handler and kill the process, orphaning its children and its clients'
jobs. Written on anyio so the trio processes and the asyncio worker share it.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import anyio
import structlog

from katydid.sdnotify import notify

log = structlog.get_logger("katydid.lifecycle")


async def until_signalled(
    drain: Callable[[], Awaitable[None]], cut: Callable[[], None] = lambda: None, *, name: str = ""
) -> None:
    """Wait for SIGINT or SIGTERM, then ``drain()``; a second signal meanwhile calls ``cut()``.
    Returns when ``drain`` does (the caller then cancels what is left)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("shutting_down", process=name, signal=signal.Signals(signum).name)
            notify("STOPPING=1")
            break

        async def second_signal() -> None:
            async for signum in signals:
                log.warning("shutting_down_now", process=name, signal=signal.Signals(signum).name)
                cut()
                return

        async with anyio.create_task_group() as tg:
            tg.start_soon(second_signal)
            await drain()
            tg.cancel_scope.cancel()
