"""Garbage on the job subjects (no headers, not a Katydid job): the worker drops each one
without redelivery, logs it sampled (a flood must not become a log storm), and keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from katydid import client
from katydid.config import DEFAULT_MODEL
from katydid.evaluation import read_manifest, wer
from katydid.messages import lane_subject
from tests.integration.stack import Stack, publish_jobs, stream_messages, wait_until

pytestmark = pytest.mark.integration

_GARBAGE = 40
_BURST = 3


async def test_garbage_jobs_are_dropped_with_sampled_logs(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    with Stack(
        tmp_path, model_dir, workers=1, log_sample_burst=_BURST, log_sample_window_s=600
    ) as stack:
        garbage = [
            (lane_subject(DEFAULT_MODEL, ("bulk", "interactive")[i % 2]), b"\xff" * 100, None)
            for i in range(_GARBAGE)
        ]
        await trio.to_thread.run_sync(publish_jobs, stack.nats_url, garbage)
        await trio.to_thread.run_sync(
            lambda: wait_until(
                lambda: stream_messages(stack.nats_url) == 0, 60, "the garbage to be dropped"
            )
        )
        bad = [e for e in stack.log_events("worker0") if e.get("event") == "bad_job"]
        assert len(bad) == _BURST, bad
        # The worker is still there and still transcribes.
        res = await client.transcribe(
            stack.url, (speech_dir / "jfk.wav").read_bytes(), fmt="wav", frame_bytes=65_536
        )
        assert res.done is not None
        jfk = next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "jfk.wav")
        assert wer(jfk.reference, res.text) <= 0.05
