"""A gateway stopped with sessions still waiting for results (SIGTERM, grace over) tells them to
come back, deletes their jobs from the stream while NATS is still connected, then exits: nothing
is left for workers to transcribe for nobody, and every session is logged."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from katydid import client
from tests.integration.stack import Stack, stream_messages, wait_until

pytestmark = pytest.mark.integration


async def test_sigterm_with_waiting_sessions_leaves_an_empty_stream(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    # No worker: the sessions' jobs stay queued until the gateway deals with them.
    with Stack(tmp_path, model_dir, workers=0, shutdown_grace_s=1) as stack:
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
