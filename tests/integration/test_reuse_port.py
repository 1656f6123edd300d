"""Two gateways on one host share the WebSocket port (SO_REUSEPORT) behind the same NATS: the
kernel spreads the sessions over both, and every session is answered."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from katydid import client
from katydid.evaluation import read_manifest, wer
from tests.integration.stack import Stack, wait_until

pytestmark = pytest.mark.integration


async def test_two_gateways_share_the_port(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    clip = next(
        c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "cmu_goforward.wav"
    )
    with Stack(tmp_path, model_dir, workers=1, reuse_port=1) as stack:
        stack.env["KATYDID_HTTP_PORT"] = "-1"  # the first gateway has the metrics port
        stack._spawn(
            [sys.executable, "-m", "katydid", "gateway", "--port", str(stack.port)], "gateway2"
        )
        wait_until(lambda: "gateway_listening" in stack.log("gateway2"), 60, "second gateway")
        results: list[client.SessionResult] = []

        async def one() -> None:
            results.append(await client.transcribe(stack.url, clip.path.read_bytes(), fmt="wav"))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        assert len(results) == 20
        for res in results:
            assert res.done is not None, res.events
            assert wer(clip.reference, res.text) <= 0.5

        def served() -> dict[str, int]:
            return {
                name: sum(1 for e in stack.log_events(name) if e.get("event") == "session")
                for name in ("gateway", "gateway2")
            }

        # A session's log line is written just after its `done` is sent: wait for the last.
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: sum(served().values()) >= 20, 10, "20 session lines")
        )
        assert sum(served().values()) == 20
        assert min(served().values()) > 0, served()  # 20 connections all on one: p = 2 / 2**20
