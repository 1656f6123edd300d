"""Native libraries' stderr lines as sampled log lines (katydid/native_stderr.py)."""

from __future__ import annotations

import json
import subprocess
import sys

_PROGRAM = r"""
import os, sys, time
import structlog
from katydid import native_stderr
from katydid.log import configure_logging

native_stderr.capture(burst=3, window_s=0.5)
configure_logging(fmt="json")
structlog.get_logger().info("ours", n=1)
for i in range(20):  # as libmpg123 writes, straight to fd 2
    os.write(2, b"[src/libmpg123/parse.c:skip_junk():1260] error: Giving up %d\n" % i)
time.sleep(0.2)
print("written by python", file=sys.stderr)
time.sleep(1.0)
"""


def test_native_lines_are_sampled_log_lines_and_our_own_lines_stay_as_they_are() -> None:
    # In a process of its own: the capture rewires the process's file descriptor 2.
    run = subprocess.run(
        [sys.executable, "-c", _PROGRAM], capture_output=True, text=True, timeout=60, check=True
    )
    lines = run.stderr.splitlines()
    assert "written by python" in lines
    events = [json.loads(line) for line in lines if line != "written by python"]
    assert [e["event"] for e in events if e["event"] == "ours"] == ["ours"]
    native = [e for e in events if e["event"] == "native_stderr"]
    assert [e["text"] for e in native] == [
        f"[src/libmpg123/parse.c:skip_junk():1260] error: Giving up {i}" for i in range(3)
    ]
    assert [e["lines"] for e in events if e["event"] == "native_stderr_suppressed"] == [17]
