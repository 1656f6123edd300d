"""A job no worker survives: JetStream gives up after ``consumer_max_deliver`` deliveries, and the
session hears it at once as that chunk's error instead of waiting out ``result_timeout_s``."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf
import trio
from trio_websocket import WebSocketConnection

from katydid import client
from katydid.audio import decode_container, float_to_pcm16
from katydid.config import DEFAULT_MODEL
from katydid.messages import Job, lane_subject
from tests.integration.stack import (
    Stack,
    frozen_busy_worker,
    publish_jobs,
    stream_messages,
    wait_until,
)

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
            pid = await trio.to_thread.run_sync(frozen_busy_worker, stack.nats_url, 60.0)
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


async def _send_file(ws: WebSocketConnection, data: bytes) -> None:
    """A whole WAV upload: start, the file in 64 KiB frames, stop."""
    await ws.send_message('{"type": "start", "format": "wav"}')
    for i in range(0, len(data), 65_536):
        await ws.send_message(data[i : i + 65_536])
    await ws.send_message('{"type": "stop"}')


def _foreign_job() -> Job:
    """A job as another gateway (since gone) would have queued it: no session here owns it."""
    return Job(
        job_id="elsewhere-0",
        session_id="elsewhere",
        seq=0,
        offset_ms=0,
        reply_subject="katydid.results.gone-gateway",
        deadline_unix_ms=int((time.time() + 600) * 1000),
    )


async def test_a_dead_job_no_session_here_owns_is_still_deleted(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    # Same crash, on a job whose gateway is gone: no session owns it, and it must not stay in
    # the work queue for good (it counts against the stream's limits). Any gateway deletes it.
    audio = decode_container(
        speech_dir / "long" / "long_ljspeech_LJ001-0001-0016.wav",
        max_audio_s=600.0,
        max_bytes=100_000_000,
    )
    pcm = float_to_pcm16(audio[: 30 * 16_000])
    with Stack(tmp_path, model_dir, workers=1, consumer_max_deliver=1) as stack:
        job = (lane_subject(DEFAULT_MODEL, "bulk"), pcm, _foreign_job().headers())
        # Its session has a record (a gateway wrote it before the job, then died): the worker
        # takes it up, and crashes on it
        await trio.to_thread.run_sync(publish_jobs, stack.nats_url, [job], ["elsewhere"])
        pid = await trio.to_thread.run_sync(frozen_busy_worker, stack.nats_url, 60.0)
        os.kill(pid, signal.SIGKILL)
        await trio.to_thread.run_sync(stack.workers[0].wait)
        # Deleted once its ack wait runs out. Bounded wait: a job left behind fails the test.
        await trio.to_thread.run_sync(
            lambda: wait_until(
                lambda: stream_messages(stack.nats_url) == 0, 60, "the dead job to be deleted"
            )
        )
        # The stream shows the deletion before the gateway has read JetStream's answer to it.
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: "job_deleted" in stack.log("gateway"), 10, "job_deleted")
        )
        assert "dead_job_unowned" in stack.log("gateway")


async def test_a_client_that_leaves_after_stop_takes_its_jobs_off_the_queue(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    # No worker is running: the jobs can only leave the stream because the gateway deletes
    # them, at once, when it notices the client has gone while waiting for its results.
    with Stack(tmp_path, model_dir, workers=0) as stack:
        data = (speech_dir / "long" / "long_ljspeech_LJ001-0001-0016.wav").read_bytes()
        async with client.connect(stack.url) as ws:
            await _send_file(ws, data)
            await trio.to_thread.run_sync(
                lambda: wait_until(
                    lambda: stream_messages(stack.nats_url) >= 4, 30, "the file's jobs queued"
                )
            )
        await trio.to_thread.run_sync(
            lambda: wait_until(
                lambda: stream_messages(stack.nats_url) == 0, 10, "the gone client's jobs deleted"
            )
        )
        sessions = [e for e in stack.log_events("gateway") if e.get("event") == "session"]
        assert [e["outcome"] for e in sessions] == ["client_gone"]
        assert sessions[0]["cancelled_jobs"] >= 4


async def test_a_client_that_leaves_while_its_file_is_still_being_queued_is_noticed(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    # Two chunks in flight at most and no worker: publishing the file's later chunks waits for
    # slots that never free. The gateway still reads the socket meanwhile, so the reset is
    # noticed at once, publishing stops, and the queued jobs leave the stream.
    with Stack(tmp_path, model_dir, workers=0, max_jobs_in_flight=2) as stack:
        data = (speech_dir / "long" / "long_ljspeech_LJ001-0001-0016.wav").read_bytes()
        async with client.connect(stack.url) as ws:
            await _send_file(ws, data)
            await trio.to_thread.run_sync(
                lambda: wait_until(
                    lambda: stream_messages(stack.nats_url) == 2, 30, "two chunks queued"
                )
            )
        left = time.monotonic()

        def session_lines() -> list[dict[str, Any]]:
            return [e for e in stack.log_events("gateway") if e.get("event") == "session"]

        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: session_lines() != [], 10, "the session to end")
        )
        assert time.monotonic() - left < 10
        (line,) = session_lines()
        assert line["outcome"] == "client_gone"
        assert line["cancelled_jobs"] == 2
        # The rest was never cut, let alone published: decoding waits for room in flight.
        assert line["chunks"] == 2
        assert line["audio_s"] < sf.info(io.BytesIO(data)).duration - 20
        await trio.to_thread.run_sync(
            lambda: wait_until(
                lambda: stream_messages(stack.nats_url) == 0, 10, "the gone client's jobs deleted"
            )
        )


async def test_a_session_past_its_client_timeout_is_a_client_error(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    # No worker: the session cannot finish; the client's deadline is a ClientError (the load
    # generator counts it), not a crash; the gateway then takes the job off the queue.
    with Stack(tmp_path, model_dir, workers=0) as stack:
        data = (speech_dir / "jfk.wav").read_bytes()
        with pytest.raises(client.ClientError) as caught:
            await client.transcribe(stack.url, data, fmt="wav", session_timeout_s=2)
        assert caught.value.kind == "session_timeout"
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: stream_messages(stack.nats_url) == 0, 10, "an empty queue")
        )
