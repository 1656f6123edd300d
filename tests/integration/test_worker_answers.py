"""What a real worker answers for a job nobody wants any more: one whose session was cancelled on
``katydid.cancel`` (``cancelled``) and one past its deadline (``expired``), neither transcribed;
and a job beside them that is transcribed as usual (its session has a record, as a gateway
writes before its first job: without one it would be ``orphaned``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import numpy as np
import pytest
import trio

from katydid.config import DEFAULT_MODEL
from katydid.messages import CANCEL_SUBJECT, Job, JobResult, lane_subject
from katydid.session_record import ATTACHED, SessionRecord
from tests.integration.stack import Stack, sessions_bucket, wait_until

pytestmark = pytest.mark.integration

_TONE = (np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000) * 16_000).astype("<i2").tobytes()


def _exchange(nats_url: str) -> dict[str, JobResult]:
    """Cancel one session, queue three jobs, and collect their results (by session)."""

    async def go() -> dict[str, JobResult]:
        nc = await nats.connect(nats_url)
        try:
            replies = await nc.subscribe("test.replies.*")  # <reply>.<the worker's user>
            await nc.publish(CANCEL_SUBJECT, b"gone")
            await nc.flush()
            js = nc.jetstream()
            kv = await sessions_bucket(js)
            record = SessionRecord("fresh", ATTACHED, "", DEFAULT_MODEL, {"format": "pcm"})
            await kv.put("fresh", record.to_json())
            now_ms = int(time.time() * 1000)
            for session, deadline_ms in (
                ("gone", now_ms + 600_000),
                ("late", now_ms - 1_000),
                ("fresh", now_ms + 600_000),
            ):
                job = Job(f"{session}-0", session, 0, 0, "test.replies", deadline_ms, token="t")
                await js.publish(
                    lane_subject(DEFAULT_MODEL, "interactive"), _TONE, headers=job.headers()
                )
            out: dict[str, JobResult] = {}
            while len(out) < 3:
                msg = await replies.next_msg(timeout=60)
                result = JobResult.from_json(msg.data)
                out[result.session] = result
            return out
        finally:
            await nc.close()

    return asyncio.run(go())


async def test_cancelled_and_expired_jobs_are_answered_not_transcribed(
    tmp_path: Path, model_dir: Path
) -> None:
    with Stack(tmp_path, model_dir, workers=0) as stack:
        stack.start_worker(0)
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: "worker_ready" in stack.log("worker0"), 60, "worker")
        )
        results = await trio.to_thread.run_sync(_exchange, stack.nats_url)
        codes = {s: (r.error or {}).get("code") for s, r in results.items()}
        assert codes == {"gone": "cancelled", "late": "expired", "fresh": None}
        assert results["gone"].token == "t"  # echoed: the gateway can tell it is real
        for skipped in ("gone", "late"):
            assert results[skipped].compute_s == 0.0
        assert results["fresh"].audio_s == pytest.approx(1.0)

        def jobs_logged() -> list[dict[str, Any]]:
            return [e for e in stack.log_events("worker0") if e.get("event") == "job"]

        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: len(jobs_logged()) == 3, 10, "logs")
        )
        outcomes = {e["session_id"]: e["outcome"] for e in jobs_logged()}
        assert outcomes == {"gone": "cancelled", "late": "expired", "fresh": "ok"}
