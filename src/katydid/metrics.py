"""Prometheus metrics of the gateway (and, from their heartbeats, of the workers).

Rule 1: metrics are updated on the trio thread only, by counters and gauges that cost a dict
lookup and an add; nothing here does I/O on the hot path. Worker figures are read from the
latest heartbeat of each worker at scrape time (a custom collector), not pushed per job.
Rule 2: one registry per Hub object (tests create many); the process collector is added to
it so that CPU seconds and resident memory of the gateway process are in the same scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from katydid import log
from katydid.messages import JobResult

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class WorkerCollector(Collector):
    """Exports each worker's last heartbeat (busy, jobs by outcome, CPU, RSS) at scrape time."""

    def __init__(self, heartbeats: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        self._heartbeats = heartbeats

    def collect(self) -> Iterator[Any]:
        beats = self._heartbeats()
        jobs = CounterMetricFamily(
            "katydid_worker_jobs", "Jobs answered by outcome", labels=["worker", "outcome"]
        )
        families = [(kind(name, text, labels=["worker"]), key) for kind, name, text, key in _BEATS]
        for worker, beat in beats.items():
            for outcome, key in (
                ("ok", "jobs_done"),
                ("skipped", "jobs_skipped"),
                ("failed", "jobs_failed"),
            ):
                jobs.add_metric([worker, outcome], float(beat.get(key) or 0))
            for family, key in families:
                family.add_metric([worker], float(beat.get(key) or 0))
        yield jobs
        yield from (family for family, _ in families)


# Per worker, from its last heartbeat: (family, name, help, the heartbeat's key). A bool
# (busy) is 1.0 or 0.0.
_BEATS: tuple[tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, str], ...] = (
    (GaugeMetricFamily, "katydid_worker_busy", "1 while the worker transcribes", "busy"),
    (CounterMetricFamily, "katydid_worker_cpu_seconds", "Worker process CPU seconds", "cpu_s"),
    (GaugeMetricFamily, "katydid_worker_resident_memory_bytes", "Worker process RSS", "rss_bytes"),
    (
        CounterMetricFamily,
        "katydid_worker_fallbacks",
        "Clip-sized runs redone with the full window",
        "fallbacks",
    ),
    (
        CounterMetricFamily,
        "katydid_worker_redecodes",
        "Runs over speech that a first run left without text",
        "redecodes",
    ),
    (
        CounterMetricFamily,
        "katydid_worker_uncovered_seconds",
        "Speech still without text after its second decode",
        "uncovered_s",
    ),
    (
        CounterMetricFamily,
        "katydid_jobs_orphaned",
        "Jobs skipped because their session had no record (nobody would read them)",
        "jobs_orphaned",
    ),
    (
        CounterMetricFamily,
        "katydid_jobs_set_aside",
        "Jobs set aside while their session waited for its client (detached, gateway gone)",
        "jobs_set_aside",
    ),
    (
        CounterMetricFamily,
        "katydid_jobs_set_aside_preempted",
        "Decodes of set-aside jobs stopped (the job kept aside) for a job that came meanwhile",
        "set_aside_preempted",
    ),
    (
        GaugeMetricFamily,
        "katydid_jobs_set_aside_now",
        "Jobs a worker holds aside now (unanswered, kept in progress)",
        "set_aside_now",
    ),
)


class _LogCollector(Collector):
    def collect(self) -> Iterator[Any]:
        lines = CounterMetricFamily(
            "katydid_log_lines", "Log lines written by this process", labels=["level"]
        )
        for level, n in sorted(log.lines_written.items()):
            lines.add_metric([level], float(n))
        yield lines
        yield CounterMetricFamily(
            "katydid_log_lines_suppressed",
            "Log lines suppressed by sampling",
            value=float(log.lines_suppressed),
        )


class GatewayMetrics:
    """The gateway's metrics, in their own registry."""

    def __init__(self, heartbeats: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        r.register(WorkerCollector(heartbeats))
        self.active_connections = Gauge(
            "katydid_active_connections", "Open client sessions", registry=r
        )
        self.peak_connections = Gauge(
            "katydid_peak_connections", "Most sessions open at once since start", registry=r
        )
        self.sessions = Counter(
            "katydid_sessions", "Finished sessions by outcome", ["outcome"], registry=r
        )
        self.jobs_published = Counter(
            "katydid_jobs_published", "Jobs queued by lane and kind", ["lane", "kind"], registry=r
        )
        self.resumption = Counter(
            "katydid_session_resumption",
            "Sessions detached (client or gateway gone), resumed here, taken over by a newer"
            " connection; records not written (the write queue at its bound)",
            ["event"],
            registry=r,
        )
        self.results = Counter(
            "katydid_results",
            "Results received by kind and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.jobs_redelivered = Gauge(
            "katydid_jobs_redelivered",
            "Redeliveries seen by the consumer of the model's lane",
            ["model", "lane"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "katydid_queue_depth",
            "Jobs waiting in the model's lane (not yet delivered)",
            ["model", "lane"],
            registry=r,
        )
        self.queue_in_progress = Gauge(
            "katydid_queue_in_progress",
            "Jobs delivered and not yet acked",
            ["model", "lane"],
            registry=r,
        )
        self.workers_live = Gauge(
            "katydid_workers_live", "Workers whose heartbeat is recent", registry=r
        )
        self.time_in_queue = Histogram(
            "katydid_time_in_queue_seconds",
            "Time a job waited before a worker took it",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.transcription = Histogram(
            "katydid_transcription_seconds",
            "Worker compute time per job",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter(
            "katydid_audio_seconds", "Audio seconds transcribed (final results)", registry=r
        )
        self.overloaded = Counter(
            "katydid_overloaded",
            "Sessions refused with 'overloaded' by reason",
            ["reason"],
            registry=r,
        )
        # Per API key (its name; "" for a key that is not in the file): only with a keys file.
        self.key_sessions = Counter(
            "katydid_key_sessions", "Sessions admitted per API key", ["key"], registry=r
        )
        self.key_audio_seconds = Counter(
            "katydid_key_audio_seconds", "Audio seconds queued per API key", ["key"], registry=r
        )
        self.key_refusals = Counter(
            "katydid_key_refusals",
            "Sessions refused per API key and reason (unauthorized or the quota)",
            ["key", "reason"],
            registry=r,
        )
        self.key_queued_jobs = Gauge(
            "katydid_key_queued_jobs", "Jobs in the stream per API key", ["key"], registry=r
        )
        r.register(_LogCollector())
        self.nats_connected = Gauge(
            "katydid_nats_connected", "1 while the gateway is connected to NATS", registry=r
        )
        self.upload_memory = Gauge(
            "katydid_upload_memory_bytes",
            "Bytes of uploads held in memory (bounded by upload_memory_total_bytes)",
            registry=r,
        )
        self.publish_window = Gauge(
            "katydid_publish_window_bytes",
            "Bytes of uploaded audio being decoded and published (bounded by publish_window_bytes)",
            registry=r,
        )
        self.publish_window_waits = Gauge(
            "katydid_publish_window_waits",
            "Uploads that waited for room in the publish window (since start)",
            registry=r,
        )
        self.publish_window_line = Gauge(
            "katydid_publish_window_line",
            "Uploads waiting in line for room in the publish window now",
            registry=r,
        )
        self.uploads_spilled = Gauge(
            "katydid_uploads_spilled",
            "Uploads written to disk because upload_memory_total_bytes was reached",
            registry=r,
        )

    def result(self, result: JobResult) -> None:
        """A worker's result, by kind and outcome (its times; its audio, if a final)."""
        outcome = result.error["code"] if result.error else "ok"
        self.results.labels(result.kind, outcome).inc()
        if outcome == "ok":
            self.time_in_queue.observe(result.queue_s)
            self.transcription.observe(result.compute_s)
            if result.kind == "final":
                self.audio_seconds.inc(result.audio_s)


def parse_text(text: str) -> dict[str, float]:
    """Parse Prometheus text exposition into ``{"name{labels}": value}`` (for the load tester)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def total(samples: Mapping[str, float], name: str) -> float:
    """Sum of every series of metric ``name`` (any labels)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))
