"""A full disk under `katydid serve`: sessions are refused `overloaded` while the store cannot
write and /readyz says why; once the space is back, the next sessions are served with no human
action (nats-server's file store keeps a write error until it restarts: serve restarts it).

Needs a small file system of its own: a 24 MB tmpfs, mounted here (root), else skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

import pytest
from websockets.sync.client import connect

from tests.integration.stack import free_port, stop_serve

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _session(port: int, wav: bytes) -> str:
    """'ok', or the error code the session got; bounded (no hang)."""
    with connect(f"ws://127.0.0.1:{port}", max_size=2**22, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "start", "format": "wav"}))
        ready = json.loads(ws.recv(timeout=30))
        if ready["type"] != "ready":
            return str(ready.get("code"))
        ws.send(wav)
        ws.send('{"type": "stop"}')
        while True:
            event = json.loads(ws.recv(timeout=60))
            if event["type"] == "done":
                return "ok"
            if event["type"] == "error":
                return str(event.get("code"))


def _fill(path: Path) -> str:
    """Write ``path`` until the disk is full; what the write said then."""
    with path.open("wb") as f:
        while True:
            try:
                f.write(b"\0" * 65536)
                f.flush()
            except OSError as exc:
                return str(exc)


def _status(data_dir: Path, env: dict[str, str]) -> dict[str, object]:
    """``katydid nats status --json``'s stream, against serve's NATS (found in its data dir)."""
    out = subprocess.run(
        [sys.executable, "-m", "katydid", "nats", "status", "--json", "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )  # fmt: skip
    return dict(json.loads(out.stdout)["stream"])


def _readiness(http_port: int) -> dict[str, object]:
    try:
        with urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=10) as answer:
            return dict(json.loads(answer.read()))
    except HTTPError as not_ready:
        with not_ready:  # it holds the connection
            return dict(json.loads(not_ready.read()))


def test_a_full_disk_heals_itself_once_space_is_back(
    small_disk: Path, model_dir: Path, speech_dir: Path, tmp_path: Path
) -> None:
    port, http_port = free_port(), free_port()
    env = os.environ | {
        "KATYDID_MODEL_DIR": str(model_dir),
        "KATYDID_LOG_FORMAT": "json",
        "KATYDID_NATS_REQUEST_TIMEOUT_S": "2",
        "KATYDID_PUBLISH_RETRY_S": "2",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as errors:
        serve = subprocess.Popen(
            [sys.executable, "-m", "katydid", "serve", "--port", str(port),
             "--http-port", str(http_port), "--workers", "1",
             "--data-dir", str(small_disk / "data")],
            stdout=subprocess.PIPE, stderr=errors, env=env, text=True,
        )  # fmt: skip
    wav = (speech_dir / "jfk.wav").read_bytes()
    try:
        assert serve.stdout is not None
        for line in serve.stdout:
            if line.startswith("workers:"):
                break
        # The default 1 GiB stream bound is more than this disk: lowered at start, in words.
        assert "stream_max_bytes_lowered" in log.read_text()
        deadline = time.monotonic() + 60
        while _session(port, wav) != "ok":
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        filler = small_disk / "filler"
        assert "No space left" in _fill(filler)
        refused = [_session(port, wav) for _ in range(3)]
        assert set(refused) == {"overloaded"}, refused
        readiness = _readiness(http_port)
        assert (readiness["ready"], readiness["jobs_stored"]) == (False, False), readiness
        # The operator's look says why.
        stream = _status(small_disk / "data", env)
        assert stream["stores_jobs"] is False, stream
        assert "cannot write" in str(stream["why"]), stream
        filler.unlink()
        freed = time.monotonic()
        while (outcome := _session(port, wav)) != "ok":
            assert outcome == "overloaded", outcome
            assert time.monotonic() - freed < 30, log.read_text()[-3000:]
            time.sleep(1)
        healed_s = time.monotonic() - freed
        assert _readiness(http_port)["ready"] is True
        assert _status(small_disk / "data", env)["stores_jobs"] is True
        text = log.read_text()
        for event in ("nats_store_fault", "nats_server_restarted", "jobs_stored_again"):
            assert f'"event": "{event}"' in text, event
        print(f"first session served {healed_s:.1f} s after the space came back")
    finally:
        stop_serve(serve)
