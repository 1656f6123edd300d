"""NATS not there. A gateway whose NATS stays away: nats-py reports every reconnect attempt (one
a second), and those lines go through the sampler (were 30 lines in 30 s, for as long as NATS
was away). An operator's command says so in words."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from katydid.ports import free_ports


def test_a_nats_that_stays_away_is_not_a_line_a_second() -> None:
    (port,) = free_ports(1)  # nothing listens there
    env = {**os.environ, "KATYDID_LOG_SAMPLE_BURST": "1", "KATYDID_LOG_SAMPLE_WINDOW_S": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "katydid", "--log-format", "json", "gateway",
         "--nats-url", f"nats://127.0.0.1:{port}", "--port", "0", "--http-port", "-1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    watchdog = threading.Timer(60, proc.kill)  # a gateway that never says it ends the read
    watchdog.start()
    errors: list[dict[str, object]] = []
    try:
        assert proc.stdout is not None
        # Until the first line after a window: it carries the attempts the sampler held back
        # (nats-py tries once a second), proof that it tried and was not written each time.
        for line in proc.stdout:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "nats_error":
                errors.append(event)
                if "suppressed" in event:
                    break
        assert proc.poll() is None, "the gateway should keep waiting for NATS"
    finally:
        watchdog.cancel()
        proc.terminate()
        proc.communicate(timeout=30)
    assert [e.get("suppressed") is None for e in errors] == [True, False], errors
    assert int(errors[1]["suppressed"]) >= 1  # type: ignore[call-overload]


def test_nats_status_with_nothing_there_says_so_in_words_at_once() -> None:
    # Was "cannot reach NATS at ...: TimeoutError()", then the same in words, after the whole
    # connect timeout (10 s by default) although the port refused at once.
    (port,) = free_ports(1)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "katydid", "nats", "status", "--nats-url",
         f"nats://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == (
        f"katydid: error: cannot reach NATS at nats://127.0.0.1:{port}: connection refused"
        " (is nats-server running there, and is the URL nats://HOST:PORT?)\n"
    )
    assert time.monotonic() - started < 8  # not the 10 s connect timeout


def test_nats_status_with_a_silent_server_says_how_long_it_waited() -> None:
    # A port that accepts and never speaks NATS: not a refusal, the connect timeout says so.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        env = {**os.environ, "KATYDID_NATS_CONNECT_TIMEOUT_S": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "katydid", "nats", "status", "--nats-url",
             f"nats://127.0.0.1:{port}"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == (
        f"katydid: error: cannot reach NATS at nats://127.0.0.1:{port}: no connection within 1 s"
        " (is nats-server running there, and is the URL nats://HOST:PORT?)\n"
    )
