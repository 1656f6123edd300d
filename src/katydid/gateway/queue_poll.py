"""The queue's state, polled once per ``queue_poll_s`` for all of a gateway's sessions (never per
session): each lane's depth from JetStream, the workers' heartbeats, and each waiting session's
place in line and wait estimate, sent to it only when they changed enough to be news."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from katydid.errors import NatsError
from katydid.gateway import operator
from katydid.gateway.live import Position

if TYPE_CHECKING:
    from katydid.gateway.hub import Hub


async def poll_queue(hub: Hub) -> None:
    """Until cancelled."""
    adm = hub.admission
    while True:
        counted = dict(adm.published_since_poll)
        try:
            adm.polled(await hub.bus.lane_stats(adm.polled_models()), counted)
        except NatsError as exc:
            hub.sampled.warning("queue_poll_failed", error=str(exc))
        if hub.seating.publish_failing_since is not None:
            await hub.seating.probe_store()
        adm.forget_gone_workers()
        hub.tenants.refresh(trio.current_time())
        operator.export_queue(hub)
        hub.sampled.flush()
        capacities = adm.capacities()
        now = trio.current_time()
        for live in list(hub.sessions.values()):
            s = live.session
            oldest = s.oldest_stream_seq
            if oldest is None:
                continue
            where = adm.position(s.model, s.lane, oldest, capacities.get(s.model), s.stored_count)
            # Only news wakes the session's writer (most polls change nothing for most).
            if where is not None and s.queue_news(*where, now):
                live.deliver(Position(*where, now), hub.inbox_bound)  # full: the next poll retries
        await trio.sleep(hub.cfg.queue_poll_s)
