"""A large upload costs the gateway a bounded amount of memory, not the file's size: it waits
in a spooled file (memory up to ``upload_memory_bytes``, then disk) and is decoded and cut block
by block after stop (a 100 MB WAV used to raise the gateway's RSS by ~500 MB)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import trio

from katydid import client
from tests.integration.stack import Stack, stream_messages, wait_until

pytestmark = pytest.mark.integration
MINUTES = 30  # 57.6 MB of 16 kHz 16-bit mono: ~170 MB of bytes and float32 samples held before


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident set so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _long_wav() -> bytes:
    rate, seconds = 16_000, MINUTES * 60
    t = np.arange(rate * 10) / rate
    ten_s = (0.2 * np.sin(2 * np.pi * 220 * t) * ((t % 2) < 1.5)).astype(np.float32)
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, 1, "PCM_16", format="WAV") as f:
        for _ in range(seconds // 10):
            f.write(ten_s)
    return buf.getvalue()


async def test_a_large_upload_holds_bounded_gateway_memory(tmp_path: Path, model_dir: Path) -> None:
    data = _long_wav()
    assert len(data) > 50_000_000
    # No worker and 4 chunks in flight: publishing waits, the file stays mostly undecoded.
    with Stack(tmp_path, model_dir, workers=0, max_jobs_in_flight=4) as stack:
        pid = stack.gateway.pid
        before = _peak_rss_mb(pid)
        async with client.connect(stack.url) as ws:
            await ws.send_message('{"type": "start", "format": "wav"}')
            for i in range(0, len(data), 262_144):
                await ws.send_message(data[i : i + 262_144])
            await ws.send_message('{"type": "stop"}')
            await trio.to_thread.run_sync(
                lambda: wait_until(
                    lambda: stream_messages(stack.nats_url) == 4, 30, "four chunks queued"
                )
            )
            grown = _peak_rss_mb(pid) - before
        await trio.to_thread.run_sync(
            lambda: wait_until(
                lambda: stream_messages(stack.nats_url) == 0, 10, "the gone client's jobs deleted"
            )
        )
    assert grown < 40, (
        f"gateway peak RSS grew by {grown:.0f} MB for a {len(data) / 1e6:.0f} MB file"
    )
