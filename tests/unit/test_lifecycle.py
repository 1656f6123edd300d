"""The one shutdown path: a real signal, a real notify socket, the drain and the cut."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
import trio

from katydid.lifecycle import until_signalled


async def test_first_signal_says_stopping_and_drains_second_cuts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(path))
        systemd.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        steps: list[str] = []
        cut = trio.Event()

        async def drain() -> None:
            steps.append("drain")
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while draining
            with trio.fail_after(10):
                await cut.wait()  # the grace ends when cut() says so, not before
            steps.append("drained")

        def cut_grace() -> None:
            steps.append("cut")
            cut.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_signalled, drain, cut_grace)
            await trio.testing.wait_all_tasks_blocked()
            assert steps == []  # nothing before a signal
            os.kill(os.getpid(), signal.SIGTERM)
        assert steps == ["drain", "cut", "drained"]
        assert systemd.recv(64) == b"STOPPING=1"
