"""Uploads are not starved by live traffic: a worker takes every ``bulk_every``-th job from the
bulk lane while the interactive lane is full (strict priority left bulk untouched for minutes)."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest

from katydid.config import DEFAULT_MODEL
from katydid.messages import Job, lane_subject
from tests.integration.stack import Stack, publish_jobs, wait_until

pytestmark = pytest.mark.integration


def _job(session: str, lane: str) -> tuple[str, bytes, dict[str, str]]:
    job = Job(
        job_id=f"{session}-0",
        session_id=session,
        seq=0,
        offset_ms=0,
        reply_subject="katydid.results.nobody",
        deadline_unix_ms=int((time.time() + 600) * 1000),
    )
    return lane_subject(DEFAULT_MODEL, lane), b"\0\0" * 16_000, job.headers()


@pytest.mark.parametrize(("bulk_every", "bulk_turn"), [(2, 1), (3, 2), (0, 6)])
def test_bulk_gets_its_turn_while_interactive_is_full(
    tmp_path: Path, model_dir: Path, bulk_every: int, bulk_turn: int
) -> None:
    with Stack(tmp_path, model_dir, workers=0, bulk_every=bulk_every) as stack:
        # Everything is queued before the worker starts, so the order it takes jobs in is the
        # lane policy's alone.
        jobs = [_job(f"i{n}", "interactive") for n in range(6)] + [_job("b0", "bulk")]
        publish_jobs(stack.nats_url, jobs)
        stack.start_worker(0)

        def taken() -> list[str]:
            return [e["session_id"] for e in stack.log_events("worker0") if e.get("event") == "job"]

        wait_until(lambda: len(taken()) == 7, 120, "the worker to answer all seven jobs")
        assert taken().index("b0") == bulk_turn, taken()


def test_queued_uploads_follow_each_other_without_a_wait_on_the_empty_interactive_lane(
    tmp_path: Path, model_dir: Path
) -> None:
    # Asking the empty interactive lane with a lingering fetch before each bulk job left the
    # worker idle for that fetch's whole timeout (0.5 s) between uploads' jobs.
    with Stack(tmp_path, model_dir, workers=0) as stack:
        publish_jobs(stack.nats_url, [_job(f"b{n}", "bulk") for n in range(6)])
        stack.start_worker(0)

        def done() -> list[dict[str, object]]:
            return [e for e in stack.log_events("worker0") if e.get("event") == "job"]

        wait_until(lambda: len(done()) == 6, 120, "the worker to answer all six jobs")
        jobs = done()
        ends = [datetime.fromisoformat(str(e["timestamp"])).timestamp() for e in jobs]
        # Between one job's log line and the next: the next job's engine time, and the
        # worker's own overhead (fetch, decode, publish, ack) — no fetch timeout.
        idle = [
            b - a - float(str(j["compute_s"]))
            for a, b, j in zip(ends, ends[1:], jobs[1:], strict=False)
        ]
        assert max(idle) < 0.25, idle
