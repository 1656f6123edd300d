"""The load report's engine baseline: an engine that cannot start is an error at once, in words,
not a wait for a timeout (it waited 10 minutes on a missing package)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from katydid.errors import EngineError
from katydid_worker.bench import bench_engine


def test_an_engine_that_cannot_start_fails_the_baseline_at_once(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.bin"
    clips = [np.zeros(16_000, dtype=np.float32)]
    started = time.monotonic()
    with pytest.raises(EngineError, match="engine baseline failed: engine process") as caught:
        bench_engine(missing, clips, processes=2, duration_s=30)
    assert "no-such-model" in str(caught.value)  # the child's own words reach the report
    assert time.monotonic() - started < 60
