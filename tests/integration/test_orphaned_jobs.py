"""A real worker reads a job's session record before it spends engine time (spec/resume.md):
without the KATYDID_SESSIONS bucket every job is transcribed (a deployment without resumption);
with it, a job whose session has no record (never written, or deleted: the session ended) is
answered ``orphaned`` and acked without engine time, and one with a record is transcribed. The
workers' count reaches the heartbeat, the gateway's metrics and ``katydid nats status``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import numpy as np
import pytest
import trio

from katydid.config import DEFAULT_MODEL
from katydid.messages import WORKERS_SUBJECT, Job, JobResult, lane_subject
from katydid.metrics import parse_text
from katydid.session_record import ATTACHED, SESSIONS_BUCKET, SessionRecord
from tests.integration.stack import Stack, http_get, stream_messages, wait_until

pytestmark = pytest.mark.integration

_TONE = (np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000) * 16_000).astype("<i2").tobytes()
NO_BUCKET, ALIVE, NOBODY, ENDED = (f"{i:032x}" for i in range(1, 5))


async def _exchange(nc: Any, sessions: list[str]) -> dict[str, JobResult]:
    """A job per session, and its result (by session)."""
    replies = await nc.subscribe("test.replies.*")  # <reply>.<the worker's user>
    js = nc.jetstream()
    deadline_ms = int(time.time() * 1000) + 600_000
    for session in sessions:
        job = Job(f"{session}-0", session, 0, 0, "test.replies", deadline_ms, token="t")
        await js.publish(lane_subject(DEFAULT_MODEL, "interactive"), _TONE, headers=job.headers())
    out: dict[str, JobResult] = {}
    while len(out) < len(sessions):
        result = JobResult.from_json((await replies.next_msg(timeout=60)).data)
        out[result.session] = result
    await replies.unsubscribe()
    return out


def _run(nats_url: str) -> tuple[dict[str, JobResult], dict[str, JobResult], dict[str, Any]]:
    async def go() -> tuple[dict[str, JobResult], dict[str, JobResult], dict[str, Any]]:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            # A deployment without resumption (a gateway that resumes makes the bucket at start).
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_key_value(SESSIONS_BUCKET)
            before = await _exchange(nc, [NO_BUCKET])
            # What a gateway does (the worker never creates it): direct gets allowed, or the
            # bucket looks absent to workers.
            kv = await js.create_key_value(bucket=SESSIONS_BUCKET, history=1, ttl=120, direct=True)
            for session in (ALIVE, ENDED):
                record = SessionRecord(session, ATTACHED, "g1", DEFAULT_MODEL, {"format": "pcm"})
                await kv.put(session, record.to_json())
            await kv.delete(ENDED)  # the session ended for good
            after = await _exchange(nc, [ALIVE, NOBODY, ENDED])
            beats = await nc.subscribe(f"{WORKERS_SUBJECT}.>")
            while True:  # the heartbeat after the last job
                beat = json.loads((await beats.next_msg(timeout=10)).data)
                if beat.get("jobs_done") == 2:
                    return before, after, beat
        finally:
            await nc.close()

    return asyncio.run(go())


def _status(stack: Stack) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "katydid", "nats", "status", "--json"],
        capture_output=True, text=True, timeout=60, check=True, env=stack.env,
    )  # fmt: skip
    return dict(json.loads(proc.stdout))


def _orphaned_metric(stack: Stack) -> float:
    scraped = parse_text(http_get(stack.metrics_url + "/metrics")[1])
    return scraped.get('katydid_jobs_orphaned_total{worker="test-w0"}', -1.0)


async def test_jobs_without_a_session_record_are_orphaned_not_transcribed(
    tmp_path: Path, model_dir: Path
) -> None:
    with Stack(tmp_path, model_dir, workers=0) as stack:
        stack.start_worker(0)
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: "worker_ready" in stack.log("worker0"), 60, "worker")
        )
        before, after, beat = await trio.to_thread.run_sync(_run, stack.nats_url)
        # No bucket: transcribed, whatever the session.
        assert before[NO_BUCKET].error is None
        assert before[NO_BUCKET].audio_s == pytest.approx(1.0)
        codes = {s: (r.error or {}).get("code") for s, r in after.items()}
        assert codes == {ALIVE: None, NOBODY: "orphaned", ENDED: "orphaned"}
        assert after[ALIVE].audio_s == pytest.approx(1.0)
        for session in (NOBODY, ENDED):
            assert after[session].compute_s == 0.0  # no engine time
            assert after[session].token == "t"  # echoed: the gateway can tell it is real
        assert "record deleted" in after[ENDED].error["message"]  # type: ignore[index]
        assert (beat["jobs_orphaned"], beat["jobs_skipped"], beat["jobs_failed"]) == (2, 2, 0)
        # Acked: nothing left in the stream, nothing redelivered.
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: stream_messages(stack.nats_url) == 0, 10, "acks")
        )

        def jobs_logged() -> list[dict[str, Any]]:
            return [e for e in stack.log_events("worker0") if e.get("event") == "job"]

        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: len(jobs_logged()) == 4, 10, "logs")
        )
        outcomes = {e["session_id"]: e["outcome"] for e in jobs_logged()}
        assert outcomes == {NO_BUCKET: "ok", ALIVE: "ok", NOBODY: "orphaned", ENDED: "orphaned"}
        assert all(e["deliveries"] == 1 for e in jobs_logged())
        events = [e.get("event") for e in stack.log_events("worker0")]
        assert events.count("sessions_unchecked") == 1  # said once, not per job
        assert "session_check_failed" not in events
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: _orphaned_metric(stack) == 2, 10, "the gateway's metric")
        )
        status = await trio.to_thread.run_sync(_status, stack)
        assert status["sessions"]["records"] == 1  # ALIVE (ENDED is a delete marker)
        assert status["sessions"]["entries"] == 2
        assert status["sessions"]["allow_direct"] is True
        assert status["results"] is None or status["results"]["messages"] >= 0
        assert [w["jobs_orphaned"] for w in status["workers"]] == [2]
