"""``python -m tests.chaos.scale [--clients N] [--gateways 1|2] [--out DIR]``: the seed scenario at
scale.

Real processes: one nats-server, two gateways sharing the WebSocket port (``reuse_port``,
SO_REUSEPORT: the kernel spreads connections; ``--gateways 1``: one gateway takes them all), two
whisper.cpp workers; ``katydid load`` (its own
process, at the server's CPU priority: clients are remote in life, and niced here they starved
and timed out connecting) runs N clients for 30 s, each sending a short clip and waiting for its
transcript; the workers run at ``worker_nice``.
Nobody may be refused: the clients accept any queue ETA (``--max-wait``) and wait as long as the
queue takes (``--session-timeout``, ``--drain``); the job stream is sized for N clips. Clients
start over the first 20 of the 30 s (a client whose start falls at the end of the duration never
starts one: at a 30 s ramp 704 of 10,000 did not), wait up to 60 s to connect and retry a failed connect with backoff (up to
6 attempts), as the seed scenario's clients do. Gateway
RSS is sampled every second: RSS per started session = (peak - before) / the most sessions that
gateway held at once (its /metrics give how many it served). Writes ``scale.json`` (and the load
report under ``load/``); exits 1 on any client error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from katydid.cli_load import find_speech_dir
from katydid.config import Config
from katydid.evaluation import read_manifest
from tests.chaos.__main__ import _host
from tests.chaos.harness import rss_kb
from tests.integration.stack import Stack, free_port, http_get, wait_until

CLIP = "cmu_goforward.wav"  # 2.8 s: the shortest-to-transcribe real clip, so the queue drains


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.scale")
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--gateways", type=int, choices=(1, 2), default=2)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("reports/scale"))
    args = parser.parse_args()
    clip = next(c for c in read_manifest(find_speech_dir() / "manifest.tsv") if c.name == CLIP)
    args.out.mkdir(parents=True, exist_ok=True)
    # Nobody may be refused: a storm of 10,000 handshakes on 2 cores starves the niced workers
    # (1.6 s a job at first) and a gateway that is behind reads their heartbeats late, so the
    # queue ETA overshoots for a while; at 4 h one client of 10,000 was once told overloaded.
    wait_s = 24 * 3600
    root = Path(tempfile.mkdtemp(prefix="katydid-scale-"))
    settings = {
        "reuse_port": 1,
        "default_max_wait_s": wait_s,  # the clients send max_wait_s too; nobody is refused
        "ready_max_eta_s": wait_s,
        "stream_max_bytes": 8 * 1024**3,  # N clips of 2.8 s (90 KB each) must fit
        "stream_max_msgs": 10 * args.clients,
        "idle_timeout_s": wait_s,
        "result_timeout_s": wait_s,
        "queue_poll_s": 1.0,  # the default (the test stack polls 4x as often)
        # A connection storm on 2 shared cores: handshakes may wait for CPU; nobody is cut off
        # for that (the clients wait as long, below).
        "handshake_timeout_s": 60,
    }
    with Stack(root, Config.load().model_dir, workers=2, **settings) as stack:
        metrics = {"gateway": stack.metrics_url}
        gateways = {"gateway": stack.gateway.pid}
        if args.gateways == 2:
            http2 = free_port()  # the WebSocket port is shared, each has its own metrics port
            second = stack._spawn(
                [sys.executable, "-m", "katydid", "gateway", "--port", str(stack.port)],
                "gateway2",
                {"KATYDID_HTTP_PORT": str(http2)},
            )
            metrics["gateway2"] = f"http://127.0.0.1:{http2}"
            wait_until(lambda: "gateway_listening" in stack.log("gateway2"), 60, "second gateway")
            gateways["gateway2"] = second.pid
        rss = {name: {"before": rss_kb(pid), "peak": 0} for name, pid in gateways.items()}
        done = threading.Event()

        def sample() -> None:
            while not done.wait(1.0):
                for name, pid in gateways.items():
                    rss[name]["peak"] = max(rss[name]["peak"], rss_kb(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        command = [
            sys.executable, "-m", "katydid", "load", "--url", stack.url,
            "--metrics-url", f"{stack.metrics_url}/metrics", "--mode", "short",
            "--files", str(clip.path), "--concurrency", str(args.clients),
            "--duration", str(args.duration), "--ramp", str(2 * args.duration / 3), "--max-wait", str(wait_s),
            "--session-timeout", str(wait_s), "--drain", str(wait_s), "--max-attempts", "6", "--connect-timeout", "60",
            "--report", str(args.out / "load"), "--json", "--nice", "0",
        ]  # fmt: skip
        started = time.monotonic()
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        done.set()
        sampler.join()
        seconds = time.monotonic() - started
        for name, pid in gateways.items():
            rss[name]["after"] = rss_kb(pid)
        summary = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
        served = {name: _served(url) for name, url in metrics.items()}
    result = {
        "host": _host(),
        "clients": args.clients,
        "seconds": round(seconds, 1),
        "load": {
            k: summary.get(k)
            for k in (
                "attempts",
                "sessions",
                "completed",
                "errors",
                "errors_by_kind",
                "errors_by_code",
                "not_retried_after_end",
                "peak_active_connections_client",
                "latency_s",
                "wall_s",
            )
        },
        "gateways": {name: rss[name] | served.get(name, {}) for name in gateways},
        "settings": settings,
    }
    for g in result["gateways"].values():
        peak_sessions = g.get("peak_sessions") or 0
        g["rss_kb_per_session"] = (
            round((g["peak"] - g["before"]) / peak_sessions, 1) if peak_sessions else None
        )
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    if out.returncode != 0:
        print(out.stderr[-4000:], file=sys.stderr)
    clean = summary.get("errors") == 0 and not summary.get("not_retried_after_end")
    return 0 if clean and out.returncode == 0 else 1


def _served(url: str) -> dict[str, int]:
    """A gateway's most sessions open at once, and sessions finished, from its /metrics."""
    status, body = http_get(f"{url}/metrics")
    assert status == 200, status
    peak = served = 0.0
    for line in body.splitlines():
        if line.startswith("katydid_peak_connections "):
            peak = float(line.split()[-1])
        elif line.startswith("katydid_sessions_total{"):
            served += float(line.split()[-1])
    return {"peak_sessions": int(peak), "sessions_served": int(served)}


if __name__ == "__main__":
    sys.exit(main())
