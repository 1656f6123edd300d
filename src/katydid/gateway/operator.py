"""What operators ask the gateway: ``/metrics``, ``/healthz``, ``/readyz``, and the queue's
gauges refreshed once per queue poll."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from katydid.httpd import Response, json_response

if TYPE_CHECKING:
    from katydid.gateway.hub import Hub


def readiness(hub: Hub) -> tuple[bool, dict[str, object]]:
    # Connected is not enough: a JetStream store with a write error (a full disk) takes no
    # job while every API call answers; /readyz said ready meanwhile.
    storing = hub.seating.publish_failing_since is None
    return hub.admission.readiness(hub.bus.connected, jobs_stored=storing)


def export_queue(hub: Hub) -> None:
    m = hub.metrics
    for (model, lane), stats in hub.admission.lanes.items():
        m.queue_depth.labels(model, lane).set(stats.pending)
        m.queue_in_progress.labels(model, lane).set(stats.in_progress)
        m.jobs_redelivered.labels(model, lane).set(stats.redelivered)
    m.workers_live.set(hub.admission.live_workers())
    m.nats_connected.set(1 if hub.bus.connected else 0)


def routes(hub: Hub) -> dict[str, Callable[[], Response]]:
    def metrics() -> Response:
        return Response(200, generate_latest(hub.metrics.registry), CONTENT_TYPE_LATEST)

    def ready() -> Response:
        ok, detail = readiness(hub)
        return json_response(200 if ok else 503, {"ready": ok, **detail})

    def health() -> Response:
        lost = hub.bus.lost
        # Alive while nats-py reconnects (a restart would not help); said here.
        nats = "closed, being replaced" if lost else "ok" if hub.bus.connected else "reconnecting"
        return json_response(
            503 if lost else 200,
            {"alive": not lost, "sessions": len(hub.sessions), "nats": nats},
        )

    return {"/metrics": metrics, "/healthz": health, "/readyz": ready}
