"""The watcher that ends a child with its parent exits as its child did, signals included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_child_killed_by_a_signal_is_reported_as_killed_by_it(sig: signal.Signals) -> None:
    # SIGKILL cannot be given a handler: restoring its default raised OSError, a traceback and
    # exit code 1 where the supervisor should have read "killed by SIGKILL".
    out = subprocess.run(
        [sys.executable, "-m", "katydid.with_parent", str(os.getpid()), "--",
         "sh", "-c", f"kill -{int(sig)} $$"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == -sig
    assert out.stderr == ""


def test_an_exit_code_is_passed_on() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "katydid.with_parent", str(os.getpid()), "--", "sh", "-c", "exit 3"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 3
