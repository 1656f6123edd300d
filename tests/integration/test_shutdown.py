"""A gateway stopped with sessions still waiting for results (SIGTERM, grace over) tells them to
come back. With resumption (the default) it detaches them: their jobs stay queued and our client
resumes each on another gateway, where it finishes as if nothing happened (a rolling restart).
Without it (``resume_window_s`` 0) it deletes their jobs from the stream while NATS is still
connected, then exits: nothing is left for workers to transcribe for nobody. Every session is
logged."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from katydid import client
from katydid.client_resume import ResumeOptions
from katydid.evaluation import wer
from tests.integration.stack import Stack, free_port, port_open, stream_messages, wait_until

pytestmark = pytest.mark.integration
JFK = "And so my fellow Americans ask not what your country can do for you ask what you can do for your country"


async def test_sigterm_without_resumption_leaves_an_empty_stream(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    # No worker: the sessions' jobs stay queued until the gateway deals with them.
    with Stack(tmp_path, model_dir, workers=0, shutdown_grace_s=1, resume_window_s=0) as stack:
        data = (speech_dir / "jfk.wav").read_bytes()
        results: list[client.SessionResult] = []
        async with trio.open_nursery() as nursery:

            async def session() -> None:
                results.append(await client.transcribe(stack.url, data, fmt="wav"))

            for _ in range(3):
                nursery.start_soon(session)
            await trio.to_thread.run_sync(
                lambda: wait_until(lambda: stream_messages(stack.nats_url) == 3, 30, "3 jobs")
            )
            stack.gateway.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(lambda: stack.gateway.wait(30))
        assert code == 0
        assert stream_messages(stack.nats_url) == 0
        for res in results:
            assert res.error is not None, res.events
            assert res.error["code"] == "overloaded"
            assert res.error["retry_after_s"] > 0
            assert res.close_code == 1013
        sessions = [e for e in stack.log_events("gateway") if e.get("event") == "session"]
        assert [e["outcome"] for e in sessions] == ["shutdown"] * 3
        assert all(e["cancelled_jobs"] == 1 for e in sessions)


async def test_sigterm_detaches_sessions_and_they_finish_on_another_gateway(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    with Stack(tmp_path, model_dir, workers=0, shutdown_grace_s=1) as stack:
        port = free_port()
        stack.env["KATYDID_HTTP_PORT"] = "-1"
        stack._spawn([sys.executable, "-m", "katydid", "gateway", "--port", str(port)], "gateway2")
        wait_until(lambda: port_open(port), 60, "second gateway")
        data = (speech_dir / "jfk.wav").read_bytes()
        results: list[client.SessionResult] = []
        async with trio.open_nursery() as nursery:

            async def session() -> None:
                results.append(
                    await client.transcribe(
                        stack.url,
                        data,
                        fmt="wav",
                        fallback_urls=[f"ws://127.0.0.1:{port}"],
                        resume=ResumeOptions(reconnect_s=60.0),
                    )
                )

            for _ in range(3):
                nursery.start_soon(session)
            await trio.to_thread.run_sync(
                lambda: wait_until(lambda: stream_messages(stack.nats_url) == 3, 30, "3 jobs")
            )
            stack.gateway.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(lambda: stack.gateway.wait(30))
            assert code == 0
            assert stream_messages(stack.nats_url) == 3  # kept for their clients
            stack.start_worker(0)  # the jobs are done now, answered to the other gateway
        for res in results:
            assert res.done is not None, res.events
            assert res.error is None, res.error
            assert [f["seq"] for f in res.finals] == [0]
            assert wer(JFK, res.text) <= 0.1, res.text
        sessions = [e for e in stack.log_events("gateway") if e.get("event") == "session"]
        assert [e["outcome"] for e in sessions] == ["shutdown"] * 3
        assert all(e["cancelled_jobs"] == 0 for e in sessions)

        # A session's log line is written just after its `done` is sent: wait for the third.
        def resumed() -> list[Any]:
            return [e for e in stack.log_events("gateway2") if e.get("event") == "session"]

        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: len(resumed()) >= 3, 10, "the resumed sessions' log lines")
        )
        assert [e["outcome"] for e in resumed()] == ["ok"] * 3
