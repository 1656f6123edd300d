"""``katydid serve``'s child processes (nats-server, the workers): how one is stopped, and how long
serve waits before it restarts one that exited."""

from __future__ import annotations

import trio

RESTART_FIRST_S = 0.5


async def terminate(proc: trio.Process, grace_s: float = 10.0) -> None:
    # Like trio's default deliver_cancel, but with a longer grace for a worker's last job.
    proc.terminate()
    with trio.move_on_after(grace_s):
        await proc.wait()
        return
    proc.kill()


def restart_backoff(previous_s: float, lived_s: float, max_s: float) -> float:
    """The wait before restarting a child that ran ``lived_s``: doubled from the last one up to
    ``max_s``, and back to the first after a minute up (a crash, not a crash loop)."""
    return RESTART_FIRST_S if lived_s > 60 else min(max_s, previous_s * 2)
