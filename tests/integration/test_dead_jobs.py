"""A job no worker survives: JetStream gives up after ``consumer_max_deliver`` deliveries, and the
session hears it at once as that chunk's error instead of waiting out ``result_timeout_s``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from katydid import client
from tests.integration.stack import Stack, busy_worker_pid, stream_messages, wait_until

pytestmark = pytest.mark.integration


async def test_a_job_every_delivery_of_which_dies_is_a_chunk_error(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    # One delivery allowed, one worker, killed in the middle of its first job: JetStream will not
    # redeliver that job once its ack wait (3 s in the stack) runs out.
    with Stack(tmp_path, model_dir, workers=1, consumer_max_deliver=1) as stack:
        data = (speech_dir / "long" / "long_ljspeech_LJ001-0001-0016.wav").read_bytes()
        result: list[client.SessionResult] = []
        async with trio.open_nursery() as nursery:

            async def session() -> None:
                result.append(
                    await client.transcribe(
                        stack.url, data, fmt="wav", frame_bytes=65_536, session_timeout_s=180
                    )
                )

            nursery.start_soon(session)
            pid = await trio.to_thread.run_sync(busy_worker_pid, stack.nats_url, 60.0)
            os.kill(pid, signal.SIGKILL)
            await trio.to_thread.run_sync(stack.workers[0].wait)
            stack.start_worker(0)
        res = result[0]
        done = res.done
        assert done is not None, res.events
        errors = [e for e in res.events if e.get("type") == "error"]
        assert len(errors) == 1, errors
        assert errors[0]["code"] == "internal"
        assert "1 deliveries" in errors[0]["message"]
        assert done["failed_chunks"] == 1
        # Every other chunk still got its final, in order around the failed one.
        assert len(res.finals) == done["chunks"] - 1
        final_seqs = [f["seq"] for f in res.finals]
        assert final_seqs == sorted(final_seqs)
        answered = sorted([f["seq"] for f in res.finals] + [errors[0]["seq"]])
        assert answered == list(range(done["chunks"]))
        # Answered within seconds of the ack wait, not after result_timeout_s (900 s).
        assert res.total_s < 120
        # The dead job no longer sits in the work queue.
        assert await trio.to_thread.run_sync(stream_messages, stack.nats_url) == 0
        assert "job_dead" in stack.log("gateway")


async def test_a_dead_job_whose_client_left_is_still_deleted(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    # Same crash, but the client vanishes before JetStream gives up: no session owns the job
    # any more, and it must not stay in the work queue for good (it counts against the limits).
    with Stack(tmp_path, model_dir, workers=1, consumer_max_deliver=1) as stack:
        data = (speech_dir / "long" / "long_ljspeech_LJ001-0001-0016.wav").read_bytes()
        async with trio.open_nursery() as nursery:

            async def session() -> None:
                await client.transcribe(
                    stack.url, data, fmt="wav", frame_bytes=65_536, session_timeout_s=180
                )

            nursery.start_soon(session)
            pid = await trio.to_thread.run_sync(busy_worker_pid, stack.nats_url, 60.0)
            os.kill(pid, signal.SIGKILL)
            nursery.cancel_scope.cancel()  # the client goes away mid-session
        await trio.to_thread.run_sync(stack.workers[0].wait)
        stack.start_worker(0)
        # The restarted worker drains what the gone session left queued; the dead job is
        # deleted once its ack wait runs out. Bounded wait: a job left behind fails the test.
        await trio.to_thread.run_sync(
            lambda: wait_until(
                lambda: stream_messages(stack.nats_url) == 0, 120, "the work queue to empty"
            )
        )
        log = stack.log("gateway")
        assert "dead_job_unowned" in log
        assert "dead_job_deleted" in log
