"""`katydid nats status`: the stream, its consumers and the live workers, without the nats CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from katydid.messages import STREAM
from tests.integration.stack import Stack, wait_until

pytestmark = pytest.mark.integration


def _status(stack: Stack, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "katydid", "nats", "status", *flags],
        capture_output=True, text=True, timeout=60, check=False, env=stack.env,
    )  # fmt: skip


def test_status_reports_stream_consumers_and_workers(tmp_path: Path, model_dir: Path) -> None:
    with Stack(tmp_path, model_dir, workers=1) as stack:
        wait_until(lambda: "worker_ready" in stack.log("worker0"), 60, "worker")
        proc = _status(stack, "--json")
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert status["stream"]["name"] == STREAM
        assert status["stream"]["messages"] == 0
        assert status["stream"]["max_msgs"] > 0
        lanes = {(c["model"], c["lane"]) for c in status["consumers"]}
        # The model by its name, as the workers table gives it (not its subject token)
        assert {("tiny.en-q8_0", lane) for lane in ("interactive", "bulk", "priority")} <= lanes
        assert [(w["id"], w["model"]) for w in status["workers"]] == [("test-w0", "tiny.en-q8_0")]
        table = _status(stack)
        assert table.returncode == 0, table.stderr
        assert STREAM in table.stdout
        assert "test-w0" in table.stdout
    gone = _status(stack)  # NATS is gone: a clear error, not a traceback
    assert gone.returncode != 0
    assert "Traceback" not in gone.stderr
    assert "katydid:" in gone.stderr
