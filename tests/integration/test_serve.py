"""`katydid serve` as a user runs it: one command, then `katydid transcribe` and `katydid eval`
against it, then SIGTERM drains and stops everything it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

import pytest

from katydid.embedded_nats import nats_server_binary
from katydid.evaluation import wer
from tests.integration.stack import (
    free_port,
    port_open,
    stop_serve,
    wait_until,
    wyoming_transcript,
)

pytestmark = pytest.mark.integration
NATS_BINARY = nats_server_binary()


def _children_of(pid: int) -> set[int]:
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True
    ).stdout
    pairs = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in pairs if pp in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def test_serve_transcribe_eval_and_drain(model_dir: Path, speech_dir: Path, tmp_path: Path) -> None:
    env = os.environ | {"KATYDID_MODEL_DIR": str(model_dir), "KATYDID_LOG_FORMAT": "json"}
    port = free_port()
    serve = _start_serve(env, port, tmp_path)
    try:
        url = f"ws://127.0.0.1:{port}"
        children = _children_of(serve.pid)
        assert len(children) >= 2  # nats-server and one worker
        jfk = speech_dir / "jfk.wav"
        reference = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
        out = subprocess.run(
            [sys.executable, "-m", "katydid", "transcribe", str(jfk), "--url", url],
            capture_output=True, text=True, env=env, timeout=120, check=True,
        )  # fmt: skip
        assert wer(reference, out.stdout) <= 0.05
        # A second server on the same data directory would share the NATS store: refused, in
        # words, before it starts anything (the first goes on serving, below).
        second = subprocess.run(
            [sys.executable, "-m", "katydid", "serve", "--port", str(free_port()),
             "--workers", "1", "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1
        assert f"another katydid serve (pid {serve.pid}) is using" in second.stderr
        lines = (speech_dir / "manifest.tsv").read_text(encoding="utf-8").splitlines()
        manifest = tmp_path / "three.tsv"
        picked = [
            ln
            for ln in lines[1:]
            if ln.split("\t")[0] in ("jfk.wav", "ls_61-70968-0000.wav", "cmu_goforward.wav")
        ]
        manifest.write_text(
            "\n".join(
                [
                    lines[0],
                    *(
                        str(speech_dir / ln.split("\t", 1)[0]) + "\t" + ln.split("\t", 1)[1]
                        for ln in picked
                    ),
                ]
            )
            + "\n"
        )
        ev = subprocess.run(
            [sys.executable, "-m", "katydid", "eval", str(manifest), "--url", url, "--json"],
            capture_output=True, text=True, env=env, timeout=300, check=True,
        )  # fmt: skip
        summary = json.loads(ev.stdout.strip().splitlines()[-1])
        assert len(summary["clips"]) == 3
        assert summary["wer"] <= 0.05
        # A crashed worker is restarted (with backoff) and the server goes on serving.
        worker = next(p for p in children if "worker" in _cmdline(p))
        os.kill(worker, signal.SIGKILL)
        wait_until(
            lambda: any("worker" in _cmdline(p) for p in _children_of(serve.pid) - {worker}),
            30,
            "a new worker",
        )
        out = subprocess.run(
            [sys.executable, "-m", "katydid", "transcribe", str(jfk), "--url", url],
            capture_output=True, text=True, env=env, timeout=120, check=True,
        )  # fmt: skip
        assert wer(reference, out.stdout) <= 0.05
        # So is its nats-server, on the same port and store: the gateway and the worker
        # reconnect (it once took the whole server down, every client cut off unanswered).
        nats = next(p for p in _children_of(serve.pid) if _cmdline(p).startswith(NATS_BINARY))
        os.kill(nats, signal.SIGKILL)
        wait_until(
            lambda: any(
                _cmdline(p).startswith(NATS_BINARY) for p in _children_of(serve.pid) - {nats}
            ),
            30,
            "a new nats-server",
        )
        # Until the gateway has reconnected its sessions are refused (overloaded, in words).
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(
                [sys.executable, "-m", "katydid", "transcribe", str(jfk), "--url", url],
                capture_output=True, text=True, env=env, timeout=120,
            )  # fmt: skip
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            assert "overloaded" in out.stderr, out.stderr
            time.sleep(1)
        assert out.returncode == 0, out.stderr
        assert wer(reference, out.stdout) <= 0.05
        children = _children_of(serve.pid)
        stop_from = (tmp_path / "serve.log").stat().st_size  # what the stop logs, below
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            stdout, _ = serve.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.communicate()
            raise
    assert serve.returncode == 0
    assert f"ws://127.0.0.1:{port}" in stdout
    assert "nats://127.0.0.1:" in stdout
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if Path(f"/proc/{p}").exists()], "serve left processes behind"
    # An orderly stop is not news: the gateway's and workers' own drains disconnect them from
    # NATS, which once logged a warning each.
    with (tmp_path / "serve.log").open("rb") as log:
        log.seek(stop_from)
        stopping = log.read().decode("utf-8", "replace")
    assert "nats_disconnected" not in stopping, stopping


def _start_serve(env: dict[str, str], port: int, tmp_path: Path) -> subprocess.Popen[str]:
    """``katydid serve`` (1 worker, a data dir of its own), listening; its stdout a pipe, its
    log in ``tmp_path/serve.log``, shown at once if it exits before listening."""
    log = tmp_path / "serve.log"
    with log.open("wb") as errors:
        serve = subprocess.Popen(
            [sys.executable, "-m", "katydid", "serve", "--port", str(port), "--workers", "1",
             "--data-dir", str(tmp_path / "data")],
            stdout=subprocess.PIPE, stderr=errors, env=env, text=True,
        )  # fmt: skip

    def listening() -> bool:
        if serve.poll() is not None:  # say why at once, not after the wait
            raise AssertionError(f"serve exited {serve.returncode}: {log.read_text()[-3000:]}")
        return port_open(port)

    try:
        wait_until(listening, 90, f"katydid serve to listen (its log: {log})")
    except BaseException:
        serve.kill()
        serve.communicate()  # and its pipe closed
        raise
    return serve


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_serve_killed_outright_leaves_no_children(model_dir: Path, tmp_path: Path) -> None:
    # Its nats-server and workers run in sessions of their own (Ctrl-C reaches serve alone):
    # they watch serve and stop when it is gone, even after a SIGKILL it cannot handle.
    env = os.environ | {"KATYDID_MODEL_DIR": str(model_dir), "KATYDID_LOG_FORMAT": "json"}
    serve = _start_serve(env, free_port(), tmp_path)
    try:
        wait_until(
            lambda: (
                any("nats-server" in _cmdline(p) for p in _children_of(serve.pid))
                and any(" worker " in _cmdline(p) for p in _children_of(serve.pid))
            ),
            30,
            "nats-server and a worker",
        )
        children = _children_of(serve.pid)
    finally:
        serve.kill()
        serve.communicate()  # and its pipe closed
    wait_until(
        lambda: not [p for p in children if _alive(p)],
        20,
        f"serve's children to stop: {[_cmdline(p) for p in children if _alive(p)]}",
    )


def test_callers_naming_a_configured_model_are_seated_while_its_worker_warms_up(
    model_dir: Path, speech_dir: Path, tmp_path: Path
) -> None:
    # Requests sent the moment `katydid serve` listens, before its worker's first heartbeat,
    # on the HTTP (openai SDK, model by its family's name), Wyoming (model by name) and vosk
    # doors: each is seated and transcribed; none is refused as an unsupported option.
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from websockets.sync.client import connect

    from katydid.audio import decode_container, float_to_pcm16

    env = os.environ | {"KATYDID_MODEL_DIR": str(model_dir), "KATYDID_LOG_FORMAT": "json"}
    port, http_port, wyoming_port = free_port(), free_port(), free_port()
    jfk = speech_dir / "jfk.wav"
    reference = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
    pcm = float_to_pcm16(decode_container(jfk, max_audio_s=60, max_bytes=10**8))

    def http() -> str:
        with (
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0
            ) as client,
            jfk.open("rb") as f,
        ):
            return client.audio.transcriptions.create(model="tiny.en", file=f, timeout=120).text

    def vosk() -> str:
        with connect(f"ws://127.0.0.1:{port}/vosk") as ws:
            ws.send(json.dumps({"config": {"sample_rate": 16000}}))
            ws.send(pcm)
            ws.send('{"eof" : 1}')
            while True:
                answer = json.loads(ws.recv(timeout=120))
                if "text" in answer:
                    return str(answer["text"])

    log = tmp_path / "serve.log"
    with log.open("wb") as errors:
        serve = subprocess.Popen(
            [sys.executable, "-m", "katydid", "serve", "--port", str(port),
             "--http-port", str(http_port), "--wyoming-port", str(wyoming_port),
             "--workers", "tiny.en-q8_0=1", "--data-dir", str(tmp_path / "data")],
            stdout=subprocess.PIPE, stderr=errors, env=env, text=True,
        )  # fmt: skip
    try:
        # Its URLs are printed once every door listens.
        assert serve.stdout is not None
        for line in serve.stdout:
            if line.startswith("workers:"):
                break
        with urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=10):
            pass
    except HTTPError as not_ready:  # 503 until a worker is up: the premise of this test
        with not_ready:  # it holds the connection
            readiness = json.loads(not_ready.read())
    else:
        serve.kill()
        pytest.fail("the worker was up before the doors listened: nothing here was warming up")
    try:
        assert readiness["workers_live"] == 0, readiness
        with ThreadPoolExecutor(3) as pool:
            sent = [
                pool.submit(http),
                pool.submit(vosk),
                pool.submit(asyncio.run, wyoming_transcript(wyoming_port, pcm, "tiny.en-q8_0")),
            ]
            texts = [f.result() for f in sent]
        for text in texts:
            assert wer(reference, text) <= 0.1, texts
        refused = [ln for ln in log.read_text().splitlines() if "unsupported_option" in ln]
        assert not refused, refused
        # The operator's look at serve's own NATS: its URL and admin credentials from the data
        # dir (before: "Authorization Violation", and no word of where the credentials are).
        status = subprocess.run(
            [sys.executable, "-m", "katydid", "nats", "status", "--json",
             "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        consumers = {c["name"] for c in report["consumers"]}
        assert "workers-tiny_en-q8_0-interactive" in consumers, status.stdout
        assert report["stream"]["stores_jobs"] is True, report["stream"]
    finally:
        stop_serve(serve)
