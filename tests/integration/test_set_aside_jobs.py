"""A real worker sets aside the jobs of sessions waiting for their client (worker Rule 7,
``katydid_worker.set_aside``): queued ahead of a live session's job are a detached session's
jobs and the jobs of a session whose gateway nobody hears (it was SIGKILLed); the live
session's job is answered first, the others once the worker has nothing else to do (none lost,
none redelivered: kept in progress past ack_wait, never nak'ed), and one whose record is
deleted while it waits is answered 'orphaned' without engine time. The counts reach the
heartbeat and the gateway's metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import wave
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
import trio

from katydid.config import DEFAULT_MODEL
from katydid.messages import WORKERS_SUBJECT, Job, JobResult, lane_subject
from katydid.metrics import parse_text
from katydid.session_record import (
    ATTACHED,
    DETACHED,
    GATEWAYS_SUBJECT,
    SessionRecord,
)
from tests.integration.stack import Stack, http_get, sessions_bucket, stream_messages, wait_until

pytestmark = pytest.mark.integration

AWAY, GONE, DELETED, LIVE = (f"{i:032x}" for i in range(11, 15))
JOBS = {AWAY: 4, GONE: 3, DELETED: 1, LIVE: 1}  # queued in this order
LIVE_GATEWAY, DEAD_GATEWAY = "g-live", "g-dead"


async def _beat(nc: Any) -> None:
    """The live session's gateway, alive (every half heartbeat)."""
    while True:
        await nc.publish(f"{GATEWAYS_SUBJECT}.{LIVE_GATEWAY}", LIVE_GATEWAY.encode())
        await asyncio.sleep(0.5)


def _run(nats_url: str, worker_pid: int, pcm: bytes) -> tuple[list[JobResult], dict[str, Any]]:
    async def go() -> tuple[list[JobResult], dict[str, Any]]:
        nc = await nats.connect(nats_url)
        beating = asyncio.create_task(_beat(nc))
        try:
            js = nc.jetstream()
            kv = await sessions_bucket(js)
            records = {
                AWAY: (DETACHED, LIVE_GATEWAY),  # its client dropped
                GONE: (ATTACHED, DEAD_GATEWAY),  # its gateway was SIGKILLed
                DELETED: (DETACHED, LIVE_GATEWAY),
                LIVE: (ATTACHED, LIVE_GATEWAY),
            }
            for session, (state, gateway) in records.items():
                record = SessionRecord(session, state, gateway, DEFAULT_MODEL, {"format": "pcm"})
                await kv.put(session, record.to_json())
            # The worker judges a gateway gone only after 3 heartbeats (1 s) of listening.
            await asyncio.sleep(3.5)
            replies = await nc.subscribe("test.replies.*")
            deadline_ms = int(time.time() * 1000) + 600_000
            # Frozen while they are queued, so it finds them all queued (as behind a gateway
            # that just died), not one at a time as they come.
            os.kill(worker_pid, signal.SIGSTOP)
            try:
                for session, n in JOBS.items():
                    for seq in range(n):
                        job = Job(
                            f"{session}-{seq}", session, seq, 0, "test.replies", deadline_ms,
                            token="t",
                        )  # fmt: skip
                        await js.publish(
                            lane_subject(DEFAULT_MODEL, "interactive"), pcm, headers=job.headers()
                        )
            finally:
                os.kill(worker_pid, signal.SIGCONT)
            results: list[JobResult] = []
            while len(results) < sum(JOBS.values()):
                result = JobResult.from_json((await replies.next_msg(timeout=60)).data)
                results.append(result)
                if result.session == LIVE:
                    await kv.delete(DELETED)  # the session ended while its job waited aside
            beats = await nc.subscribe(f"{WORKERS_SUBJECT}.>")
            give_up = time.monotonic() + 10
            while True:  # a heartbeat after the last job
                beat = json.loads((await beats.next_msg(timeout=10)).data)
                if beat.get("jobs_skipped", 0) + beat.get("jobs_done", 0) == 9:
                    return results, beat
                assert time.monotonic() < give_up, beat
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            await nc.close()

    return asyncio.run(go())


def _metric(stack: Stack, name: str) -> float:
    scraped = parse_text(http_get(stack.metrics_url + "/metrics")[1])
    return scraped.get(f'{name}{{worker="test-w0"}}', -1.0)


async def test_a_live_sessions_job_goes_before_jobs_waiting_for_their_client(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    # Real speech (11 s), so that decoding the set-aside jobs takes a while: the one whose
    # record is deleted meanwhile is looked at again before its turn comes.
    with wave.open(str(speech_dir / "jfk.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16_000, 1, 2)
        pcm = w.readframes(w.getnframes())
    with Stack(tmp_path, model_dir, workers=0) as stack:
        worker = stack.start_worker(0)
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: "worker_ready" in stack.log("worker0"), 60, "worker")
        )
        results, beat = await trio.to_thread.run_sync(_run, stack.nats_url, worker.pid, pcm)
        order = [r.session for r in results]
        assert order[0] == LIVE, order  # ahead of the 8 queued before it
        codes = [(r.session, (r.error or {}).get("code")) for r in results]
        assert sorted(codes, key=str) == sorted(
            [(AWAY, None)] * 4 + [(GONE, None)] * 3 + [(DELETED, "orphaned"), (LIVE, None)],
            key=str,
        )
        # Each session's jobs in their order (the oldest set-aside job is decoded first).
        for session in (AWAY, GONE):
            assert [r.seq for r in results if r.session == session] == list(range(JOBS[session]))
        deleted = next(r for r in results if r.session == DELETED)
        assert deleted.compute_s == 0.0  # no engine time
        assert "record deleted" in deleted.error["message"]  # type: ignore[index]
        assert (beat["jobs_set_aside"], beat["jobs_orphaned"], beat["set_aside_now"]) == (8, 1, 0)
        assert beat["jobs_done"] == 8
        # Nothing left in the stream, nothing redelivered: never nak'ed, kept in progress.
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: stream_messages(stack.nats_url) == 0, 10, "acks")
        )

        def jobs_logged() -> list[dict[str, Any]]:
            return [e for e in stack.log_events("worker0") if e.get("event") == "job"]

        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: len(jobs_logged()) == 9, 10, "logs")
        )
        logged = jobs_logged()
        assert logged[0]["session_id"] == LIVE
        assert all(e["deliveries"] == 1 for e in logged)
        held_s = max(e["queue_s"] for e in logged)
        events = [e.get("event") for e in stack.log_events("worker0")]
        assert events.count("set_aside_started") >= 1
        assert "set_aside_empty" in events
        await trio.to_thread.run_sync(
            lambda: wait_until(
                lambda: _metric(stack, "katydid_jobs_set_aside_total") == 8, 10, "the metric"
            )
        )
        assert _metric(stack, "katydid_jobs_set_aside_now") == 0
        print(
            f"live job answered first after {logged[0]['queue_s']:.3f} s in the queue;",
            f"set-aside jobs waited up to {held_s:.2f} s;",
            "compute per job",
            [round(e["compute_s"], 3) for e in logged],
        )
