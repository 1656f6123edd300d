"""``python -m tests.chaos.waiting [--sessions N]``: gateway RSS per session waiting in the queue.

``katydid serve --workers 1`` with its worker stopped (SIGSTOP: nothing is taken from the queue),
N clients (trio-websocket, one process) each send ``start``, 3 s of PCM and ``stop`` and wait
until the gateway says ``queued``. Prints JSON: the gateway's RSS before, when every session is
queued, and 12 s later (after the gateway's heap trim, every ``malloc_trim_interval_s``), per
session. Start a fresh server per measurement: a gateway keeps heap it has used once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import trio
from trio_websocket import open_websocket_url

from katydid.ports import free_ports
from tests.chaos.__main__ import _host
from tests.chaos.harness import rss_kb
from tests.integration.stack import port_open, wait_until


def _pcm(seconds: float = 3.0) -> bytes:
    t = np.arange(int(seconds * 16_000)) / 16_000
    voiced = (t % 1.0) < 0.7  # 0.7 s of tone, 0.3 s of silence: cut like speech
    return (np.sin(2 * np.pi * 220 * t) * 0.3 * 32767 * voiced).astype("<i2").tobytes()


async def _clients(url: str, n: int, pid: int) -> dict[str, float]:
    pcm = _pcm()
    queued = 0
    done = trio.Event()

    async def client() -> None:
        nonlocal queued
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"type": "start", "max_wait_s": 86_400}))
            for i in range(0, len(pcm), 3200):
                await ws.send_message(pcm[i : i + 3200])
            await ws.send_message('{"type": "stop"}')
            while (event := json.loads(await ws.get_message()))["type"] != "queued":
                if event["type"] == "error":
                    raise RuntimeError(f"refused: {event}")
            queued += 1
            await done.wait()

    before = rss_kb(pid)
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(client)
        with trio.fail_after(300):
            while queued < n:  # noqa: ASYNC110 - a count over many tasks, polled twice a second
                await trio.sleep(0.5)
        all_queued = rss_kb(pid)
        await trio.sleep(12)
        later = rss_kb(pid)
        done.set()
    return {
        "sessions": n,
        "rss_kb_before": before,
        "rss_kb_all_queued": all_queued,
        "rss_kb_12s_later": later,
        "kb_per_session_all_queued": round((all_queued - before) / n, 1),
        "kb_per_session_12s_later": round((later - before) / n, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.waiting")
    parser.add_argument("--sessions", type=int, default=1000)
    args = parser.parse_args()
    port, http_port = free_ports(2)
    ports = ["--port", str(port), "--http-port", str(http_port)]
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "katydid",
            "--log-format",
            "json",
            "serve",
            "--workers",
            "1",
            *ports,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: port_open(port), 120, "katydid serve")
        time.sleep(5)  # the worker is up and has said so
        workers = subprocess.run(
            ["pgrep", "-P", str(serve.pid), "-f", "worker"], capture_output=True, text=True
        ).stdout.split()
        if not workers:
            raise SystemExit("no worker process found to stop: the queue would not hold")
        for pid in workers:
            os.kill(int(pid), signal.SIGSTOP)
        url = f"ws://127.0.0.1:{port}/"
        result = trio.run(_clients, url, args.sessions, serve.pid)
        for pid in workers:
            os.kill(int(pid), signal.SIGCONT)
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
    print(json.dumps({"host": _host()} | result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
