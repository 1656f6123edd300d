"""``katydid load``: the load tester, with the engine's own speed measured beside it."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from katydid.audio import decode_container, float_to_pcm16, sniff_container
from katydid.config import Config
from katydid.errors import KatydidError
from katydid.evaluation import read_manifest
from katydid.load.backoff import RetryPolicy
from katydid.load.report import engine_on_mix, markdown, summarize, write
from katydid.load.runner import ClipData, LoadRunner, LoadSpec, LoadStats

_LONG_DIR = "long"


def add_parsers(sub: Any) -> None:
    ld = sub.add_parser("load", help="load-test a server with virtual clients over WebSockets")
    ld.add_argument("--url", help="gateway URL (omit with --serve)")
    ld.add_argument(
        "--serve", action="store_true", help="start `katydid serve` for the run and stop it after"
    )
    ld.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="workers for --serve and the engine baseline",
    )
    ld.add_argument("--metrics-url", help="the gateway's /metrics (automatic with --serve)")
    ld.add_argument("--mode", choices=("short", "stream", "long"), default="short")
    ld.add_argument(
        "--files", nargs="+", type=Path, help="audio files (default: the shared speech clips)"
    )
    ld.add_argument("--concurrency", type=int, default=10)
    ld.add_argument(
        "--duration", type=float, default=10.0, help="seconds during which sessions start"
    )
    ld.add_argument("--ramp", type=float, default=0.0, help="seconds over which clients start")
    ld.add_argument("--session-timeout", type=float, default=900.0)
    ld.add_argument(
        "--drain",
        type=float,
        default=600.0,
        help="seconds to wait for sessions in flight at the end",
    )
    ld.add_argument(
        "--max-attempts", type=int, default=6, help="attempts per session (with backoff)"
    )
    ld.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds a client waits for TCP connect, then again for the handshake (%(default)s)",
    )
    ld.add_argument(
        "--max-wait", type=float, help="the clients' max_wait_s (queue ETA they accept)"
    )
    ld.add_argument(
        "--api-key",
        default=os.environ.get("KATYDID_API_KEY"),
        help="the server's API key, if it needs one (default: KATYDID_API_KEY)",
    )
    ld.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="fraction of sessions whose connection the client resets once mid-stream (no close"
        " frame) and resumes; the report counts finals lost, duplicated, out of order",
    )
    ld.add_argument(
        "--partials",
        action="store_true",
        help="the sessions ask for partial results (live streams: --mode stream)",
    )
    ld.add_argument(
        "--engine-baseline",
        action="store_true",
        help="measure the engine alone first, same clips and processes",
    )
    ld.add_argument("--baseline-duration", type=float, default=20.0)
    ld.add_argument(
        "--report", type=Path, help="write report.json, report.md (and report.png) here"
    )
    ld.add_argument(
        "--json", action="store_true", help="print the summary as JSON on the last line"
    )
    ld.add_argument(
        "--nice",
        type=int,
        default=10,
        help="lower the load generator's CPU priority (it shares the machine)",
    )


def find_speech_dir() -> Path:
    for base in (Path.cwd(), *Path.cwd().parents):
        candidate = base / "shared" / "data" / "speech"
        if (candidate / "manifest.tsv").is_file():
            return candidate
        sibling = base.parent / "shared" / "data" / "speech"
        if (sibling / "manifest.tsv").is_file():
            return sibling
    raise KatydidError("no speech clips found (../shared/data/speech): pass --files or --manifest")


def default_files(mode: str) -> list[Path]:
    clips = read_manifest(find_speech_dir() / "manifest.tsv")
    long = [c.path for c in clips if c.path.parent.name == _LONG_DIR]
    short = [c.path for c in clips if c.path.parent.name != _LONG_DIR]
    return long if mode == "long" else short


def load_clips(files: list[Path], mode: str) -> list[ClipData]:
    out = []
    for path in files:
        data = path.read_bytes()
        audio = decode_container(data, max_audio_s=4 * 3600, max_bytes=len(data) + 1)
        if mode == "stream":
            out.append(ClipData(path.name, float_to_pcm16(audio), "pcm_s16le", audio.size / 16_000))
        else:
            out.append(
                ClipData(path.name, data, sniff_container(data[:16]) or "wav", audio.size / 16_000)
            )
    return out


def engine_baseline(
    cfg: Config, files: list[Path], processes: int, duration_s: float
) -> dict[str, float]:
    from katydid_worker import models
    from katydid_worker.bench import bench_engine
    from katydid_worker.engine_options import EngineOptions

    audio = [decode_container(p, max_audio_s=4 * 3600, max_bytes=1 << 30) for p in files]
    opts = EngineOptions(
        language=cfg.language,
        threads=cfg.engine_threads,
        beam_size=cfg.beam_size,
        pieces=cfg.engine_pieces,
    )
    result = bench_engine(
        models.prepare(cfg.model_dir, cfg.model),
        audio,
        processes=processes,
        duration_s=duration_s,
        options=opts,
    )
    return result.as_dict()


def _baseline_for(
    stats: LoadStats,
    clips: list[ClipData],
    before: dict[str, Any],
    after: dict[str, Any],
    processes: int,
) -> dict[str, Any]:
    """The engine's speed on the mix of clips the load's sessions sent (``engine_on_mix``),
    before and after the load and their mean; the bench's own even mix beside it. Where a clip
    was never timed, the even mix is all there is (and the report says which)."""
    sent = Counter(r.clip for r in stats.records if r.outcome == "ok")
    counts = [sent.get(c.name, 0) for c in clips]
    audio = [c.audio_s for c in clips]
    even = [before["audio_s_per_s"], after["audio_s_per_s"]]
    on_before, on_after = (
        engine_on_mix(b.get("clip_s") or [None] * len(clips), audio, counts, processes)
        for b in (before, after)
    )
    before_s, after_s = even
    weighted = False
    if on_before is not None and on_after is not None:
        before_s, after_s, weighted = round(on_before, 3), round(on_after, 3), True
    return {
        "processes": processes,
        "audio_s_per_s": round((before_s + after_s) / 2, 3),
        "before_audio_s_per_s": before_s,
        "after_audio_s_per_s": after_s,
        "weighted_by_load_mix": weighted,
        "even_mix_audio_s_per_s": round(sum(even) / 2, 3),
    }


class ServeProcess:
    """`katydid serve` as a child process on free ports, for the duration of a load run."""

    def __init__(self, cfg: Config, workers: int, log_path: Path) -> None:
        from katydid.ports import free_ports

        self.port, self.http_port = free_ports(2)
        argv = [
            sys.executable, "-m", "katydid", "--model", cfg.model, "--model-dir", str(cfg.model_dir),
            "--log-format", "json", "serve", "--port", str(self.port), "--http-port", str(self.http_port),
            "--workers", str(workers),
        ]  # fmt: skip
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"ws://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.http_port}/metrics"
        self._wait_ready(workers, timeout_s=180)

    def _wait_ready(self, workers: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        ready_url = self.metrics_url.replace("/metrics", "/readyz")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KatydidError(f"katydid serve exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as resp:
                    if json.load(resp).get("workers_live", 0) >= workers:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise KatydidError("katydid serve did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _progress(stats: LoadStats, point: dict[str, float]) -> None:
    line = (
        f"\r t={point['t']:6.1f}s  active={int(point['active_client']):5d}  completed={int(point['completed']):6d}  "
        f"errors={int(point['errors']):4d}  overloaded={int(point['overloaded']):4d}  "
        f"queue={int(point.get('queue_depth', 0)):5d}"
    )
    print(line, end="", file=sys.stderr, flush=True)


def cmd_load(cfg: Config, args: argparse.Namespace) -> int:
    if not 0.0 <= args.drop_rate <= 1.0:
        raise KatydidError("--drop-rate is a fraction of sessions, from 0 to 1")
    files = args.files or default_files(args.mode)
    clips = load_clips(files, args.mode)
    command = "katydid " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    engine = None
    if args.engine_baseline:
        print(
            f"engine baseline: {args.workers} processes, {args.baseline_duration:.0f} s ...",
            file=sys.stderr,
        )
        engine = engine_baseline(cfg, files, args.workers, args.baseline_duration)
        print(f"engine baseline: {engine}", file=sys.stderr)
    server = None
    if args.serve:
        server = ServeProcess(cfg, args.workers, (args.report or Path(".")) / "serve.log")
    # The clients share this machine with the server they measure: they should take CPU only
    # when the server does not need it (the server keeps its priority).
    if args.nice:
        os.nice(args.nice)
    try:
        url = server.url if server else args.url
        if not url:
            raise KatydidError("pass --url or --serve")
        spec = LoadSpec(
            url=url,
            clips=clips,
            mode=args.mode,
            concurrency=args.concurrency,
            duration_s=args.duration,
            ramp_s=args.ramp,
            session_timeout_s=args.session_timeout,
            connect_timeout_s=args.connect_timeout,
            drain_s=args.drain,
            retry=RetryPolicy(max_attempts=args.max_attempts),
            metrics_url=server.metrics_url if server else args.metrics_url,
            max_wait_s=args.max_wait,
            api_key=args.api_key,
            drop_rate=args.drop_rate,
            partials=args.partials,
        )
        stats = trio.run(LoadRunner(spec, on_tick=_progress if sys.stderr.isatty() else None).run)
        if sys.stderr.isatty():
            print(file=sys.stderr)
    finally:
        if server:
            server.stop()
    if engine is not None:
        # Again after the load: this host's speed drifts between minutes (±25 % seen), so the
        # ratio is taken against the mean of the engine's speed before and after.
        after = engine_baseline(cfg, files, args.workers, args.baseline_duration)
        print(f"engine baseline after the load: {after}", file=sys.stderr)
        engine = _baseline_for(stats, clips, engine, after, args.workers)
    summary = summarize(
        stats, command=command, engine=engine, workers=args.workers if (server or engine) else None
    )
    print(markdown(summary))
    if args.report:
        for path in write(summary, args.report):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {k: v for k, v in summary.items() if k not in ("timeline", "latency_timeline")}
            )
        )
    resume = summary["resume"]
    broken = resume["finals_lost"] + resume["finals_duplicated"] + resume["finals_out_of_order"]
    return 0 if summary["errors"] == 0 and broken == 0 else 1
