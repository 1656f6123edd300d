"""What a worker says about itself in every heartbeat (``WorkerStats``): its jobs, the engine's
fallbacks and re-decodes, its CPU time and memory (the gateway's metrics come from it)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class WorkerStats:
    worker_id: str
    model: str
    multilingual: bool = False
    busy: bool = False
    job_stream_seq: int | None = None  # the job in hand (its stream sequence) while busy
    jobs_done: int = 0
    jobs_skipped: int = 0
    jobs_failed: int = 0
    jobs_orphaned: int = 0  # of jobs_skipped: their session had no record (liveness.py)
    jobs_set_aside: int = 0  # set aside while their session waited for its client (set_aside.py)
    set_aside_now: int = 0  # held aside now
    set_aside_preempted: int = 0  # idle decodes of set-aside jobs stopped for a fetched job
    audio_s: float = 0.0
    compute_s: float = 0.0
    started_unix: float = field(default_factory=time.time)
    fallbacks: int = 0  # clip-sized runs redone with the full window (engine guardrails)
    redecodes: int = 0  # runs over speech a first run left without text (engine coverage)
    uncovered_s: float = 0.0  # speech still without text after its second decode

    def to_json(self) -> bytes:
        avg = self.compute_s / self.jobs_done if self.jobs_done else None
        return json.dumps(
            {
                "id": self.worker_id,
                "model": self.model,
                "multilingual": self.multilingual,
                "busy": self.busy,
                "job_stream_seq": self.job_stream_seq,
                "jobs_done": self.jobs_done,
                "jobs_skipped": self.jobs_skipped,
                "jobs_failed": self.jobs_failed,
                "jobs_orphaned": self.jobs_orphaned,
                "jobs_set_aside": self.jobs_set_aside,
                "set_aside_now": self.set_aside_now,
                "set_aside_preempted": self.set_aside_preempted,
                "avg_compute_s": avg,
                "rtf": self.compute_s / self.audio_s if self.audio_s else None,
                "pid": os.getpid(),
                "cpu_s": round(time.process_time(), 3),
                "fallbacks": self.fallbacks,
                "redecodes": self.redecodes,
                "uncovered_s": round(self.uncovered_s, 2),
                "rss_bytes": _rss_bytes(),
                "uptime_s": round(time.time() - self.started_unix, 1),
            }
        ).encode()


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
