"""The load report's accounting: the host's CPU (busy and stolen seconds, from /proc/stat) and
the engine baseline taken on the load's own mix of clips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from katydid.load.report import engine_on_mix
from katydid.load.runner import host_cpu_s


def test_host_cpu_counts_busy_and_steal_apart_from_idle(tmp_path: Path) -> None:
    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(
        f"cpu  {1 * hz} {2 * hz} {3 * hz} {500 * hz} {7 * hz} {4 * hz} {5 * hz} {6 * hz} 0 0\n"
        "cpu0 1 2 3 4 5 6 7 8 0 0\n",
        encoding="ascii",
    )
    assert host_cpu_s(str(stat)) == {"host_busy_s": 15.0, "host_steal_s": 6.0}


def test_no_proc_stat_gives_no_host_figures(tmp_path: Path) -> None:
    assert host_cpu_s(str(tmp_path / "missing")) == {}
    (tmp_path / "odd").write_text("intr 1 2 3\n", encoding="ascii")
    assert host_cpu_s(str(tmp_path / "odd")) == {}


def test_the_engine_baseline_is_taken_on_the_load_s_own_mix() -> None:
    # Two clips: 2 s of audio in 0.2 s, 8 s of audio in 2.0 s (a fallback's double run).
    clip_s, audio = [0.2, 2.0], [2.0, 8.0]
    even = engine_on_mix(clip_s, audio, [1, 1], processes=2)
    slow_heavy = engine_on_mix(clip_s, audio, [1, 3], processes=2)
    assert even == pytest.approx(10.0 / 1.1)  # 2 engines: 10 audio-s in 2.2 / 2 s
    assert slow_heavy == pytest.approx(26.0 / 3.1)
    assert slow_heavy is not None
    assert even is not None
    assert slow_heavy < even
    # A clip the load sent that the engine never timed: no weighted figure.
    assert engine_on_mix([0.2, None], audio, [1, 1], processes=2) is None
    assert engine_on_mix([0.2, None], audio, [4, 0], processes=2) == pytest.approx(20.0)


def test_the_report_counts_this_run_s_connections_not_the_gateway_s_lifetime_peak() -> None:
    from katydid.load.report import summarize
    from katydid.load.runner import LoadSpec, LoadStats

    stats = LoadStats(LoadSpec(url="ws://x", clips=[]))
    # A gateway that held 10,010 connections in an earlier run, then 40 in this one.
    stats.timeline = [
        {"t": 0.0, "gateway_peak": 10010.0, "gateway_active": 0.0, "gateway_rss": 100e6},
        {"t": 1.0, "gateway_peak": 10010.0, "gateway_active": 40.0, "gateway_rss": 104e6},
        {"t": 2.0, "gateway_peak": 10010.0, "gateway_active": 10.0, "gateway_rss": 103e6},
    ]
    out = summarize(stats, command="katydid load")
    assert out["peak_active_connections"] == 40
    assert out["gateway_rss_bytes_per_connection"] == 100000.0
    # A gateway started for this run (serve): its own peak gauge is this run's, and exact.
    for point, peak in zip(stats.timeline, (0.0, 45.0, 45.0), strict=True):
        point["gateway_peak"] = peak
    assert summarize(stats, command="katydid load")["peak_active_connections"] == 45
