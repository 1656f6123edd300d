"""The load report's CPU accounting: the host's busy and stolen seconds, read from /proc/stat."""

from __future__ import annotations

import os
from pathlib import Path

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
