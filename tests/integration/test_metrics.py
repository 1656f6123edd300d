"""Metrics, health and readiness of a real gateway with real workers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from katydid import client
from katydid.metrics import parse_text, total
from tests.integration.stack import Stack, http_get, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("metrics"), model_dir, workers=1) as s:
        yield s


def _scrape(stack: Stack) -> dict[str, float]:
    status, body = http_get(stack.metrics_url + "/metrics")
    assert status == 200
    return parse_text(body)


async def test_metrics_present_and_moving(stack: Stack, speech_dir: Path) -> None:
    # Wait until the gateway has seen the worker's heartbeat and polled the queue.
    await trio.to_thread.run_sync(
        lambda: wait_until(lambda: http_get(stack.metrics_url + "/readyz")[0] == 200, 30, "ready")
    )
    before = _scrape(stack)
    res = await client.transcribe(
        stack.url, (speech_dir / "jfk.wav").read_bytes(), fmt="wav", frame_bytes=65_536
    )
    assert res.done is not None
    # The gateway counts the session when its handler ends, just after the client saw 'done'.
    sessions_before = total(before, "katydid_sessions_total")
    await trio.to_thread.run_sync(
        lambda: wait_until(
            lambda: total(_scrape(stack), "katydid_sessions_total") > sessions_before,
            10,
            "session count",
        )
    )
    after = await trio.to_thread.run_sync(_scrape, stack)
    assert total(after, "katydid_sessions_total") == sessions_before + 1
    assert after['katydid_sessions_total{outcome="ok"}'] >= 1
    assert total(after, "katydid_jobs_published_total") > total(
        before, "katydid_jobs_published_total"
    )
    assert (
        total(after, "katydid_audio_seconds_total")
        >= total(before, "katydid_audio_seconds_total") + 10.9
    )
    assert after["katydid_transcription_seconds_count"] > before.get(
        "katydid_transcription_seconds_count", 0
    )
    assert after["katydid_active_connections"] == 0
    assert after["katydid_peak_connections"] >= 1
    assert after["katydid_workers_live"] == 1
    assert total(after, "katydid_log_lines_total") > 0
    assert "katydid_log_lines_suppressed_total" in after
    assert 'katydid_queue_depth{lane="interactive",model="tiny.en-q8_0"}' in after
    assert after["process_resident_memory_bytes"] > 0
    # The worker's own figures arrive with its next heartbeat.
    key = 'katydid_worker_jobs_total{outcome="ok",worker="test-w0"}'
    await trio.to_thread.run_sync(
        lambda: wait_until(lambda: _scrape(stack).get(key, 0) >= 1, 10, "worker heartbeat")
    )
    assert _scrape(stack)['katydid_worker_resident_memory_bytes{worker="test-w0"}'] > 0


def test_health_and_readiness(stack: Stack) -> None:
    status, body = http_get(stack.metrics_url + "/healthz")
    assert status == 200
    assert json.loads(body)["alive"] is True
    wait_until(lambda: http_get(stack.metrics_url + "/readyz")[0] == 200, 30, "ready")
    status, body = http_get(stack.metrics_url + "/readyz")
    detail = json.loads(body)
    assert detail["ready"] is True
    assert detail["workers_live"] == 1
    assert http_get(stack.metrics_url + "/nope")[0] == 404


def test_readyz_is_false_without_workers(tmp_path: Path, model_dir: Path) -> None:
    with Stack(tmp_path, model_dir, workers=0) as lonely:
        status, body = http_get(lonely.metrics_url + "/readyz")
    assert status == 503
    detail = json.loads(body)
    assert detail["ready"] is False
    assert detail["workers"] is False
    assert detail["nats_connected"] is True
