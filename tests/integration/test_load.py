"""The load tester against a real small setup: a few clients for a few seconds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from katydid import client
from katydid.cli_load import load_clips
from katydid.load.backoff import RetryPolicy
from katydid.load.report import markdown, summarize
from katydid.load.runner import ClipData, LoadRunner, LoadSpec
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("load"), model_dir, workers=2) as s:
        yield s


def _clips(speech_dir: Path, mode: str = "short") -> list[ClipData]:
    return load_clips(
        [speech_dir / "cmu_goforward.wav", speech_dir / "ls_260-123286-0001.wav"], mode
    )


async def test_a_few_clients_for_a_few_seconds(stack: Stack, speech_dir: Path) -> None:
    spec = LoadSpec(
        url=stack.url,
        clips=_clips(speech_dir),
        concurrency=4,
        duration_s=3.0,
        drain_s=120.0,
        metrics_url=stack.metrics_url + "/metrics",
    )
    stats = await LoadRunner(spec).run()
    summary = summarize(stats, command="test", engine={"audio_s_per_s": 10.0}, workers=2)
    assert summary["errors"] == 0, summary["errors_by_kind"]
    assert summary["completed"] == summary["sessions"] >= 4
    assert summary["attempts"] == summary["sessions"]
    assert summary["peak_active_connections"] >= 4
    assert summary["throughput_audio_s_per_s"] > 0
    assert summary["engine_ratio"] == pytest.approx(
        summary["throughput_audio_s_per_s"] / 10.0, rel=1e-2
    )
    assert summary["latency_s"]["total"]["p50"] is not None
    assert summary["gateway_rss_bytes"]["peak"] > 0
    assert summary["gateway_log_lines_per_s"]["max"] is not None
    assert summary["queued_updates_per_session"]["max"] >= 1  # every session is told its place
    for key in (
        "attempts",
        "completed",
        "errors",
        "errors_by_code",
        "overloaded",
        "peak_active_connections",
        "throughput_audio_s_per_s",
        "engine_ratio",
    ):
        assert key in summary
    assert "| **errors** | **0** |" in markdown(summary)


async def test_overloaded_clients_back_off_and_are_not_errors_until_they_give_up(
    stack: Stack, speech_dir: Path
) -> None:
    # Uploads admitted first and holding still (their jobs counted ahead) and a max_wait_s
    # below one job's time: the gateway refuses at admission with retry_after_s.
    spec = LoadSpec(
        url=stack.url,
        clips=_clips(speech_dir),
        concurrency=3,
        duration_s=4.0,
        drain_s=30.0,
        max_wait_s=0.01,
        retry=RetryPolicy(base_s=0.2, max_s=1.0, max_attempts=3),
    )
    async with client.connect(stack.url) as one, client.connect(stack.url) as two:
        for ahead in (one, two):  # one for each of the two workers
            await ahead.send_message(json.dumps({"type": "start", "format": "wav"}))
            assert json.loads(await ahead.get_message())["type"] == "ready"
        stats = await LoadRunner(spec).run()
    assert stats.overloaded >= 3
    assert stats.completed == 0
    assert set(stats.errors_by_kind) <= {"overloaded_gave_up"}
    # Bounded: never more attempts than sessions x max_attempts, and retries waited (no spin).
    assert stats.attempts <= len(stats.records) * 3
    assert stats.attempts < 3 * 4.0 / 0.2 * 3
    # The server's retry_after_s (at least 1 s) was honoured: three attempts take two waits of
    # at least that, where backoff alone (0.2 s, then 0.4 s) would have taken under 0.6 s.
    gave_up = [r for r in stats.records if r.attempts == 3]
    assert gave_up
    assert all(r.finished_s - r.started_s >= 2.0 for r in gave_up), [
        round(r.finished_s - r.started_s, 2) for r in gave_up
    ]
