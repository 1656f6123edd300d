"""The sampled logger: bounded lines per window, suppressed counts reported."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import structlog

from katydid.log import SampledLogger, configure_logging


class _Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))


def test_burst_then_suppression_then_report() -> None:
    now = [0.0]
    rec = _Recorder()
    log = SampledLogger(rec, burst=3, window_s=10.0, clock=lambda: now[0])
    written = [log.warning("client_gone", n=i) for i in range(1000)]
    assert sum(written) == 3
    assert log.suppressed_total == 997
    # Other events have their own budget.
    assert log.warning("frame_rejected")
    now[0] = 10.0
    assert log.warning("client_gone", n=1000)
    assert rec.lines[-1] == ("client_gone", {"n": 1000, "suppressed": 997})
    assert len(rec.lines) == 5


def test_a_burst_followed_by_silence_is_reported_when_its_window_ends() -> None:
    now = [0.0]
    rec = _Recorder()
    log = SampledLogger(rec, burst=2, window_s=10.0, clock=lambda: now[0])
    for i in range(50):
        log.warning("session", n=i)
    assert log.flush() == 0  # the window is still open
    now[0] = 10.0
    assert log.flush() == 1
    assert rec.lines[-1] == ("session", {"suppressed": 48, "summary": True})
    assert log.flush() == 0  # reported once
    assert log.warning("session", n=50)  # a new window, a new budget
    assert rec.lines[-1] == ("session", {"n": 50})


def test_kinds_of_one_event_sampled_apart_do_not_crowd_one_another_out() -> None:
    now = [0.0]
    rec = _Recorder()
    log = SampledLogger(rec, burst=2, window_s=10.0, clock=lambda: now[0])
    detached = ("session:detached", {"outcome": "detached"})
    for i in range(100):
        log.log("warning", "session", sample_as=detached, n=i, outcome="detached")
    big = ("session:too_large", {"outcome": "too_large"})
    assert log.log("warning", "session", sample_as=big, outcome="too_large")
    assert rec.lines[-1] == ("session", {"outcome": "too_large"})
    now[0] = 10.0
    assert log.flush() == 1
    assert rec.lines[-1] == ("session", {"suppressed": 98, "summary": True, "outcome": "detached"})


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_traceback_does_not_show_local_variables(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A frame that parses a client's message holds the message: its API key and prompt.
    saved = structlog.get_config()
    try:
        configure_logging(fmt=fmt)

        def parse(message: str) -> None:
            raise ValueError("bad message")

        message = '{"api_key": "sk-' + 'SECRET-1234"}'  # not in any source line shown
        try:
            parse(message)
        except ValueError:
            structlog.get_logger("t").exception("session_failed")
    finally:
        structlog.configure(**saved)
    err = capsys.readouterr().err
    assert "session_failed" in err  # the line and its traceback are there
    assert "bad message" in err
    assert "sk-SECRET" not in err


def test_a_library_logging_through_logging_gets_sampled_structured_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # hypercorn's "Error in ASGI Framework" with a traceback, python-multipart's complaints:
    # a client can provoke them at will.
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging(fmt="json")
        library = logging.getLogger("some.library")
        for i in range(50):
            try:
                raise RuntimeError(f"boom {i}")
            except RuntimeError:
                library.exception("Error in ASGI Framework")
        library.info("chatter")  # below warning
    finally:
        structlog.configure(**saved)
        root.handlers, root.level = handlers, level
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 5  # sampled: 5 per 10 s
    assert {line["event"] for line in lines} == {"Error in ASGI Framework"}
    assert (lines[0]["logger"], lines[0]["level"]) == ("some.library", "error")
    assert lines[0]["exception"][0]["exc_value"] == "boom 0"


def test_processes_sharing_a_log_never_split_one_anothers_lines(tmp_path: Any) -> None:
    # serve's workers and a systemd unit's processes write to one stderr; a line written in
    # two parts (text, then its newline) was cut by another process's line: 26% of 60,000
    # lines of three such processes were not JSON.
    import subprocess
    import sys

    script = (
        "from katydid.log import configure_logging\n"
        "import structlog\n"
        "configure_logging(fmt='json')\n"
        "log = structlog.get_logger('t')\n"
        "for i in range(3000):\n"
        "    log.info('line', i=i, pad='x' * 80)\n"
    )
    path = tmp_path / "shared.log"
    with path.open("ab") as shared:
        procs = [subprocess.Popen([sys.executable, "-c", script], stderr=shared) for _ in range(3)]
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 9000
    for line in lines:
        assert json.loads(line)["event"] == "line", line
