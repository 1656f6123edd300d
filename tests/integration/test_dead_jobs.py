"""A job no worker survives: JetStream gives up after ``consumer_max_deliver`` deliveries, and the
session hears it at once as that chunk's error instead of waiting out ``result_timeout_s``."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import trio

from katydid import client
from katydid.messages import STREAM
from tests.integration.stack import Stack, busy_worker_pid

pytestmark = pytest.mark.integration


def _stream_messages(nats_url: str) -> int:
    import nats

    async def count() -> int:
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().stream_info(STREAM)
            return int(info.state.messages)
        finally:
            await nc.close()

    return asyncio.run(count())


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
        assert await trio.to_thread.run_sync(_stream_messages, stack.nats_url) == 0
        assert "job_dead" in stack.log("gateway")
