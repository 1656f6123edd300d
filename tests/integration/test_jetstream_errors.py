"""JetStream's refusals mean what their codes say: a real nats-server refuses a job with a header
over 64 KB (never retryable: too_large) differently from a stream at its bound (retry later)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats.js.errors
import pytest

from katydid.bus.nats_connection import connect, translate
from katydid.bus.nats_stream import ensure_stream
from katydid.config import DEFAULT_MODEL, Config
from katydid.errors import JobTooLarge, NatsError, StreamFull
from katydid.messages import lane_subject
from tests.integration.stack import free_port
from tests.integration.test_stale_jobs import _start_nats

pytestmark = pytest.mark.integration


def _refusal(cfg: Config, headers: dict[str, str], *, fill: bool) -> NatsError:
    async def go() -> NatsError:
        nc = await connect(cfg, "test")
        try:
            js = nc.jetstream()
            await ensure_stream(js, cfg, [DEFAULT_MODEL])
            subject = lane_subject(DEFAULT_MODEL, "interactive")
            if fill:
                await js.publish(subject, b"\0\0" * 160)  # a stream of max_msgs=1 is full
            try:
                await js.publish(subject, b"\0\0" * 160, headers=headers)
            except nats.js.errors.APIError as exc:
                return translate(exc)
            raise AssertionError("the second job was accepted")
        finally:
            await nc.close()

    return asyncio.run(go())


def test_full_stream_and_oversized_header_are_told_apart(tmp_path: Path) -> None:
    port = free_port()
    cfg = Config(nats_url=f"nats://127.0.0.1:{port}", stream_max_msgs=1)
    server = _start_nats(tmp_path / "js", port)
    try:
        big = _refusal(cfg, {"Katydid-Options": "x" * 70_000}, fill=False)
        assert isinstance(big, JobTooLarge), big
        assert not isinstance(big, StreamFull)
        full = _refusal(cfg, {"n": "1"}, fill=True)
        assert isinstance(full, StreamFull), full
    finally:
        server.terminate()
        server.wait()
