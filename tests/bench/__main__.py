"""``python -m tests.bench [--model M] engine|long|latency ...``: the lab's benchmarks (what
``nox -s bench`` and ``nox -s latency`` run). Measurement a user does not run lives here, outside
the shipped package; ``katydid load`` (the load tester) ships.

- ``engine``: the raw engine in N processes (no gateway, no NATS); with ``--compare
  faster-whisper`` side by side with faster-whisper, ``--mix`` per length bucket;
- ``long``: long recordings through every contender (``longform.py``);
- ``latency``: live latency on a `katydid serve` (``latency.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from katydid.audio import decode_container
from katydid.cli_load import ServeProcess, engine_baseline, find_speech_dir
from katydid.config import Config
from katydid.cpu import cpu_model, cpu_simd_flags
from katydid.errors import KatydidError
from katydid.evaluation import read_manifest, word_errors
from katydid.log import configure_logging

_LONG_DIR = "long"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--config", type=Path, help="a katydid TOML config file")
    parser.add_argument("--model", help="model name (default: the configured one)")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--engine-threads", type=int)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parsers(sub)
    return parser


def _add_parsers(sub: Any) -> None:
    bench = sub
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
    bl.add_argument(
        "--streams",
        type=int,
        default=1,
        help="concurrent real-time streams with partials, each every clip back to back from a "
        "different one (1: one clip at a time, each then as a file)",
    )
    bl.add_argument(
        "--door",
        choices=("native", "realtime"),
        default="native",
        help="the door streamed to: the native WebSocket, or the OpenAI Realtime transcription "
        "door on the HTTP port (24 kHz pcm16 appends, a commit where native sends stop); the "
        "files go to the native door either way",
    )
    bl.add_argument(
        "--realtime-url",
        help="with --url and --door realtime: the running gateway's Realtime door "
        "(ws://HOST:HTTP_PORT/v1/realtime?intent=transcription)",
    )
    bl.add_argument("--json", action="store_true")


def _long(cfg: Config, args: argparse.Namespace) -> int:
    """``long``: see longform.py."""
    from katydid_worker import models
    from tests.bench import longform

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
        ServeProcess(cfg, args.workers, Path("reports") / "long" / "serve.log")
        if args.workers
        else None
    )
    try:
        if server is not None:
            contenders.append(longform.through_server(server.url, server.proc.pid))
        print(f"bench long: {len(files)} files, {len(contenders)} contenders ...", file=sys.stderr)
        runs = longform.measure(contenders, files)
    finally:
        if server is not None:
            server.stop()
    command = "python -m tests.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
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
    if args.command == "long":
        return _long(cfg, args)
    manifest = args.manifest or find_speech_dir() / "manifest.tsv"
    clips = [
        c
        for c in read_manifest(manifest)
        if c.path.parent.name != _LONG_DIR or args.manifest or getattr(args, "mix", False)
    ]
    if args.command == "latency":
        return _latency(cfg, args, clips)
    if args.compare:
        if not 1 <= args.passes <= 20:
            raise KatydidError(f"--passes must be between 1 and 20, got {args.passes}")
        if args.mix:
            return _compare_mix(cfg, clips, passes=args.passes, as_json=args.json)
        return _compare(cfg, clips, passes=args.passes, as_json=args.json)
    result = engine_baseline(cfg, [c.path for c in clips], args.processes, args.duration)
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
    from tests.bench import latency

    if args.streams < 1:
        raise KatydidError(f"--streams must be at least 1, got {args.streams}")

    data = [
        (c.name, decode_container(c.path, max_audio_s=4 * 3600, max_bytes=1 << 30), c.reference)
        for c in clips
    ]
    if args.url and args.door == "realtime" and not args.realtime_url:
        raise KatydidError("--door realtime with --url needs --realtime-url")
    server = None
    if not args.url:
        server = ServeProcess(cfg, args.workers, Path("reports") / "latency" / "serve.log")
    try:
        url = args.url or server.url  # type: ignore[union-attr]
        stream_url = url
        if args.door == "realtime":
            stream_url = (
                args.realtime_url
                or f"ws://127.0.0.1:{server.http_port}/v1/realtime?intent=transcription"  # type: ignore[union-attr]
            )
        how = "one at a time" if args.streams == 1 else f"{args.streams} streams at once"
        print(
            f"streaming {len(data)} clips in real time (100 ms frames, {args.pause_s:.1f} s pause "
            f"after each) to the {args.door} door at {stream_url}, {how}, then each as a file to "
            f"{url} ...",
            file=sys.stderr,
        )
        if args.streams == 1:
            results = latency.run(
                url, data, pause_after_s=args.pause_s, door=args.door, stream_url=stream_url
            )
        else:
            results = latency.run_concurrent(
                url,
                data,
                streams=args.streams,
                pause_after_s=args.pause_s,
                door=args.door,
                stream_url=stream_url,
            )
    finally:
        if server:
            server.stop()
    summary = latency.report(results) | {
        "door": args.door,
        "streams": args.streams,
        "host": _host(),
    }
    print(
        f"door {args.door}; model {cfg.model}; {args.workers if server else '?'} worker(s); "
        f"{args.streams} stream(s); {_host()}; load average at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    show = latency.markdown if args.streams == 1 else latency.markdown_streams
    print(show(results, summary))
    if args.json:
        print(json.dumps(summary))
    return 0


def _host() -> str:
    """The CPU this ran on, for the report (figures mean nothing without it)."""
    return f"{cpu_model()} ({' '.join(cpu_simd_flags())}), {os.cpu_count()} CPUs"


def _contenders(cfg: Config) -> tuple[Path, list[Any]]:
    """Katydid (clip-sized windows as configured; with ``engine_pieces``, speech too long for
    one clip-sized window in clip-sized pieces; the full window alone) and faster-whisper int8
    (beam 5 and 1), same model."""
    import dataclasses

    from katydid_worker import models
    from katydid_worker.engine_options import EngineOptions
    from tests.bench import compare

    model_path = models.prepare(cfg.model_dir, cfg.model)
    ct2_dir = models.source(cfg.model).package_dirs()[0]
    if models.source(cfg.model).parts:
        raise KatydidError(
            "--compare needs a model whose CTranslate2 files are in one package (tiny.en)"
        )
    opts = EngineOptions(
        language=cfg.language,
        threads=cfg.engine_threads,
        beam_size=cfg.beam_size,
        pieces=cfg.engine_pieces,
    )
    contenders = [
        compare.katydid(model_path, opts),
        compare.katydid(model_path, dataclasses.replace(opts, pieces=True)),
        compare.katydid(model_path, dataclasses.replace(opts, clip_context=False)),
        *compare.faster_whisper(ct2_dir, threads=cfg.engine_threads, beam_sizes=(5, 1)),
    ]
    return model_path, contenders


_NAMES = (
    "katydid",
    "katydid_pieces",
    "katydid_full_context",
    "faster_whisper",
    "faster_whisper_greedy",
)


def _compare_mix(cfg: Config, clips: list[Any], *, passes: int, as_json: bool) -> int:
    """``--compare --mix``: per length bucket clips/s, audio-s/s and WER for each engine."""
    from katydid_worker.engine_build import build_info
    from tests.bench import compare, mix

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
        one = rows["katydid"]["clips_per_s"]
        pieces_gain = rows["katydid_pieces"]["clips_per_s"] / one if one else 0.0
        rows["ratio_pieces"] = {"clips_per_s": round(pieces_gain, 3)}
        print(f"| {bucket} | katydid with engine_pieces / katydid | | {pieces_gain:.2f}x | | |")
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
    from katydid_worker.engine_build import build_info
    from tests.bench import compare

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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = Config.load(
        args.config,
        overrides={
            "model": args.model,
            "model_dir": args.model_dir,
            "engine_threads": args.engine_threads,
        },
    )
    configure_logging(level=cfg.log_level, fmt=cfg.log_format)
    try:
        return cmd_bench(cfg, args)
    except KatydidError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
