"""``katydid load`` and ``katydid bench engine``: the load tester and the engine baseline."""

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
from katydid.evaluation import read_manifest, word_errors
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

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True, metavar="WHAT"
    )
    be = bench.add_parser(
        "engine", help="the raw engine in N processes on the same clips (no gateway, no NATS)"
    )
    be.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    be.add_argument("--duration", type=float, default=20.0)
    be.add_argument(
        "--manifest",
        type=Path,
        help="clips in the evaluation manifest format (default: shared short clips)",
    )
    be.add_argument("--json", action="store_true")
    be.add_argument(
        "--compare",
        choices=("faster-whisper",),
        help="side by side with faster-whisper int8, same process, interleaved clip by clip",
    )
    be.add_argument(
        "--mix",
        action="store_true",
        help="with --compare: live traffic's lengths (2-30 s; recordings over 30 s cut at pauses, "
        "as the gateway cuts), reported per length bucket; includes the manifest's long clips",
    )
    be.add_argument(
        "--passes",
        type=int,
        default=1,
        help="with --compare: passes over the clips; each clip's time is its median (1-20)",
    )

    bg = bench.add_parser(
        "long",
        help="long recordings: Katydid (local and through serve), whisper.cpp on the whole file, "
        "faster-whisper int8 beam 1 and 5; WER and CPU seconds, interleaved",
    )
    bg.add_argument(
        "--manifest", type=Path, help="long-form clips with references (default: shared mixes.tsv)"
    )
    bg.add_argument(
        "--workers", type=int, default=2, help="workers for the server it starts (0: no server)"
    )
    bg.add_argument("--json", action="store_true")

    bl = bench.add_parser(
        "latency",
        help="live latency: end of speech → final, partial interval, streaming vs file WER",
    )
    bl.add_argument("--url", help="a running gateway (default: start `katydid serve` for the run)")
    bl.add_argument("--workers", type=int, default=2, help="workers for the server it starts")
    bl.add_argument(
        "--manifest", type=Path, help="clips with references (default: shared short clips)"
    )
    bl.add_argument("--pause-s", type=float, default=2.0, help="silence streamed after each clip")
    bl.add_argument("--json", action="store_true")


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


def _engine_baseline(
    cfg: Config, files: list[Path], processes: int, duration_s: float
) -> dict[str, float]:
    from katydid_worker import models
    from katydid_worker.bench import bench_engine
    from katydid_worker.engine import EngineOptions

    audio = [decode_container(p, max_audio_s=4 * 3600, max_bytes=1 << 30) for p in files]
    opts = EngineOptions(language=cfg.language, threads=cfg.engine_threads, beam_size=cfg.beam_size)
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


class _Server:
    """`katydid serve` as a child process on free ports, for the duration of a load run."""

    def __init__(self, cfg: Config, workers: int, log_path: Path) -> None:
        from katydid.serve import free_ports

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
    files = args.files or default_files(args.mode)
    clips = load_clips(files, args.mode)
    command = "katydid " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    engine = None
    if args.engine_baseline:
        print(
            f"engine baseline: {args.workers} processes, {args.baseline_duration:.0f} s ...",
            file=sys.stderr,
        )
        engine = _engine_baseline(cfg, files, args.workers, args.baseline_duration)
        print(f"engine baseline: {engine}", file=sys.stderr)
    server = None
    if args.serve:
        server = _Server(cfg, args.workers, (args.report or Path(".")) / "serve.log")
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
        after = _engine_baseline(cfg, files, args.workers, args.baseline_duration)
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
    return 0 if summary["errors"] == 0 else 1


def _long(cfg: Config, args: argparse.Namespace) -> int:
    """``katydid bench long``: see katydid_worker/longform.py."""
    from katydid_worker import longform, models

    manifest = args.manifest or find_speech_dir() / "mixes.tsv"
    files = [
        longform.LongFile(
            c.path, decode_container(c.path, max_audio_s=4 * 3600, max_bytes=1 << 30), c.reference
        )
        for c in read_manifest(manifest)
    ]
    model_path = models.prepare(cfg.model_dir, cfg.model)
    src = models.source(cfg.model)
    if src.parts:
        raise KatydidError("bench long needs a model whose CTranslate2 files are in one package")
    threads = cfg.engine_threads
    contenders = [
        longform.katydid_local(model_path, cfg),
        longform.whisper_cpp_direct(model_path, threads),
        *longform.faster_whisper(src.package_dirs()[0], threads, (1, 5)),
    ]
    server = (
        _Server(cfg, args.workers, Path("reports") / "long" / "serve.log") if args.workers else None
    )
    try:
        if server is not None:
            contenders.append(longform.through_server(server.url, server.proc.pid))
        print(f"bench long: {len(files)} files, {len(contenders)} contenders ...", file=sys.stderr)
        runs = longform.measure(contenders, files)
    finally:
        if server is not None:
            server.stop()
    command = "katydid " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"`{command}`, threads {threads}, server workers {args.workers}\n")
    print(longform.markdown(runs, files, _host()))
    if args.json:
        print(
            json.dumps(
                {
                    r.name: {
                        "wer": round(r.wer, 5),
                        "cpu_s": round(r.cpu_s, 3),
                        "wall_s": round(r.wall_s, 3),
                        "files": {
                            n: {"wer": round(f.wer, 5), "cpu_s": round(f.cpu_s, 3),
                                "wall_s": round(f.wall_s, 3), "text": f.text}
                            for n, f in r.files.items()
                        },
                    }
                    for r in runs
                }
            )
        )  # fmt: skip
    return 0


def cmd_bench(cfg: Config, args: argparse.Namespace) -> int:
    if args.bench_command == "long":
        return _long(cfg, args)
    manifest = args.manifest or find_speech_dir() / "manifest.tsv"
    clips = [
        c
        for c in read_manifest(manifest)
        if c.path.parent.name != _LONG_DIR or args.manifest or getattr(args, "mix", False)
    ]
    if args.bench_command == "latency":
        return _latency(cfg, args, clips)
    if args.compare:
        if not 1 <= args.passes <= 20:
            raise KatydidError(f"--passes must be between 1 and 20, got {args.passes}")
        if args.mix:
            return _compare_mix(cfg, clips, passes=args.passes, as_json=args.json)
        return _compare(cfg, clips, passes=args.passes, as_json=args.json)
    result = _engine_baseline(cfg, [c.path for c in clips], args.processes, args.duration)
    print("| engine | processes | clips | audio s | wall s | clips/s | audio-s/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| katydid (whisper.cpp {cfg.model}) | {result['processes']} | {result['clips']} | "
        f"{result['audio_s']} | {result['wall_s']} | {result['clips_per_s']} | {result['audio_s_per_s']} |"
    )
    if args.json:
        print(json.dumps({"katydid": result}))
    return 0


def _latency(cfg: Config, args: argparse.Namespace, clips: list[Any]) -> int:
    from katydid.load import latency

    data = [
        (c.name, decode_container(c.path, max_audio_s=4 * 3600, max_bytes=1 << 30), c.reference)
        for c in clips
    ]
    server = None
    if not args.url:
        server = _Server(cfg, args.workers, Path("reports") / "latency" / "serve.log")
    try:
        url = args.url or server.url  # type: ignore[union-attr]
        print(
            f"streaming {len(data)} clips in real time (100 ms frames, {args.pause_s:.1f} s pause "
            f"after each) to {url}, one at a time, then each as a file ...",
            file=sys.stderr,
        )
        results = latency.run(url, data, pause_after_s=args.pause_s)
    finally:
        if server:
            server.stop()
    summary = latency.report(results)
    print(f"model {cfg.model}; {args.workers if server else '?'} worker(s); {_host()}")
    print(latency.markdown(results, summary))
    if args.json:
        print(json.dumps(summary))
    return 0


def _host() -> str:
    """The CPU this ran on, for the report (figures mean nothing without it)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "CPU unknown"
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
        "?",
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    simd = [
        f
        for f in flags
        if f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile", "amx_int8")
    ]
    return f"{model} ({' '.join(simd)}), {os.cpu_count()} CPUs"


def _contenders(cfg: Config) -> tuple[Path, list[Any]]:
    """Katydid (clip-sized and full window) and faster-whisper int8 (beam 5 and 1), same model."""
    import dataclasses

    from katydid_worker import compare, models
    from katydid_worker.engine import EngineOptions

    model_path = models.prepare(cfg.model_dir, cfg.model)
    ct2_dir = models.source(cfg.model).package_dirs()[0]
    if models.source(cfg.model).parts:
        raise KatydidError(
            "--compare needs a model whose CTranslate2 files are in one package (tiny.en)"
        )
    opts = EngineOptions(language=cfg.language, threads=cfg.engine_threads, beam_size=cfg.beam_size)
    contenders = [
        compare.katydid(model_path, opts),
        compare.katydid(model_path, dataclasses.replace(opts, clip_context=False)),
        *compare.faster_whisper(ct2_dir, threads=cfg.engine_threads, beam_sizes=(5, 1)),
    ]
    return model_path, contenders


_NAMES = ("katydid", "katydid_full_context", "faster_whisper", "faster_whisper_greedy")


def _compare_mix(cfg: Config, clips: list[Any], *, passes: int, as_json: bool) -> int:
    """``--compare --mix``: per length bucket clips/s, audio-s/s and WER for each engine."""
    from katydid_worker import compare, mix
    from katydid_worker.engine import build_info

    source = [
        (c.name, decode_container(c.path, max_audio_s=4 * 3600, max_bytes=1 << 30), c.reference)
        for c in clips
    ]
    pieces = mix.build(source)
    refs = mix.group_references(source, pieces)
    model_path, contenders = _contenders(cfg)
    runs = dict(
        zip(
            _NAMES,
            compare.measure(contenders, [(m.audio, m.reference) for m in pieces], passes=passes),
            strict=True,
        )
    )
    audio_s = sum(m.duration_s for m in pieces)
    print(
        f"mix: {len(pieces)} utterances of {min(m.duration_s for m in pieces):.1f}-"
        f"{max(m.duration_s for m in pieces):.1f} s ({audio_s:.0f} s of audio) from {len(source)} "
        f"recordings; {cfg.engine_threads} thread(s) each, engines interleaved clip by clip, "
        f"median of {passes} pass(es); {_host()}"
    )
    print(f"model {model_path.name}; whisper.cpp build: {build_info()}")
    print("| bucket | engine | clips | clips/s | audio-s/s | WER (whole clips) |")
    print("|---|---|---:|---:|---:|---:|")
    out: dict[str, Any] = {"buckets": {}, "pooled": {}}
    for bucket, _, _ in mix.BUCKETS:
        idx = [i for i, m in enumerate(pieces) if m.bucket == bucket]
        if not idx:
            continue
        rows: dict[str, dict[str, float]] = {}
        for key, run in runs.items():
            t = sum(run.per_clip_s[i] for i in idx)
            a = sum(pieces[i].duration_s for i in idx)
            errors = words = 0
            for i in idx:
                if pieces[i].reference is not None:
                    e, w = word_errors(pieces[i].reference or "", run.texts[i])
                    errors, words = errors + e, words + w
            rows[key] = {
                "clips": len(idx),
                "clips_per_s": round(len(idx) / t, 3) if t else 0.0,
                "audio_s_per_s": round(a / t, 3) if t else 0.0,
                "wer": round(100 * errors / words, 2) if words else float("nan"),
            }
            print(
                f"| {bucket} | {run.name} | {len(idx)} | {rows[key]['clips_per_s']} | "
                f"{rows[key]['audio_s_per_s']} | {rows[key]['wer']}% |"
            )
        best_fw = max(
            rows["faster_whisper"]["clips_per_s"], rows["faster_whisper_greedy"]["clips_per_s"]
        )
        ratio = rows["katydid"]["clips_per_s"] / best_fw if best_fw else 0.0
        rows["ratio_vs_faster_whisper_best"] = {"clips_per_s": round(ratio, 3)}
        print(f"| {bucket} | **katydid / faster-whisper (faster beam)** | | **{ratio:.2f}x** | | |")
        out["buckets"][bucket] = rows
    print()
    for key, run in runs.items():
        e, w = mix.pooled_errors(pieces, run.texts, refs)
        out["pooled"][key] = {"wer": round(100 * e / w, 2) if w else 0.0}
        print(f"pooled WER {run.name}: {100 * e / w:.2f}% ({e}/{w} words; cut recordings joined)")
    diff = out["pooled"]["katydid"]["wer"] - out["pooled"]["faster_whisper"]["wer"]
    print(f"katydid - faster-whisper beam 5 pooled WER: {diff:+.2f} points")
    if as_json:
        print(json.dumps(out))
    return 0


def _compare(cfg: Config, clips: list[Any], *, passes: int, as_json: bool) -> int:
    from katydid_worker import compare
    from katydid_worker.engine import build_info

    data = [
        (decode_container(c.path, max_audio_s=4 * 3600, max_bytes=1 << 30), c.reference)
        for c in clips
    ]
    model_path, contenders = _contenders(cfg)
    names = _NAMES
    runs = dict(zip(names, compare.measure(contenders, data, passes=passes), strict=True))
    k, full, fw = runs["katydid"], runs["katydid_full_context"], runs["faster_whisper"]
    worst = max(a / b for a, b in zip(k.per_clip_s, full.per_clip_s, strict=True))
    print(
        f"{len(data)} clips, {sum(a.size for a, _ in data) / 16000:.1f} s of audio, {cfg.engine_threads} thread(s) each, "
        f"engines interleaved clip by clip, median of {passes} pass(es) per clip"
    )
    build = build_info()
    print(f"model {model_path.name}; whisper.cpp build: {build}")
    print("| engine | WER | clips/s | audio-s/s | compute s | slowest clip s | fallbacks |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in runs.values():
        d = run.as_dict()
        print(
            f"| {d['name']} | {100 * run.wer:.2f}% | {d['clips_per_s']} | {d['audio_s_per_s']} | {d['compute_s']} | {d['worst_clip_s']} | {d['fallbacks']} |"
        )
    ratio = k.clips_per_s / fw.clips_per_s if fw.clips_per_s else 0.0
    print(
        f"katydid / faster-whisper clips/s: {ratio:.2f}x; WER difference {100 * (k.wer - fw.wer):+.2f} points"
    )
    print(f"slowest clip relative to its own full-context time: {worst:.2f}x")
    if as_json:
        out = {name: run.as_dict() for name, run in runs.items()}
        out["ratio"] = {
            "clips_per_s": round(ratio, 3),
            "wer_points": round(100 * (k.wer - fw.wer), 3),
            "worst_vs_full_context": round(worst, 3),
        }
        out["engine_build"] = {"model": model_path.name, "whisper_cpp": build}
        print(json.dumps(out))
    return 0
