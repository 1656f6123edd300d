"""``katydid transcribe`` and ``katydid eval``: audio files through the engine in this process
(``--local``; eval without ``--url``), or through a running server (``cli_client``)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from katydid.config import Config
from katydid.errors import ConfigError, KatydidError

if TYPE_CHECKING:
    from katydid_worker.engine import Engine
    from katydid_worker.engine_options import DecodeOptions
    from katydid_worker.transcript import Transcript

_PROGRESS_MIN_AUDIO_S = 30.0


def _engine(cfg: Config) -> Engine:
    from katydid_worker import models
    from katydid_worker.engine import Engine
    from katydid_worker.engine_options import EngineOptions

    path = models.resolve(cfg.model_dir, cfg.model)
    return Engine(
        path,
        EngineOptions(
            language=cfg.language,
            threads=cfg.engine_threads,
            beam_size=cfg.beam_size,
            word_timestamps=cfg.word_timestamps,
            calibration_cache=cfg.calibration_cache,
            pieces=cfg.engine_pieces,
        ),
    )


def _transcribe_file(
    engine: Engine, cfg: Config, path: Path, decode: DecodeOptions | None = None
) -> Transcript:
    from katydid.audio import SAMPLE_RATE, decode_container
    from katydid_worker.local import transcribe_recording

    audio = decode_container(path, max_audio_s=cfg.max_audio_s, max_bytes=cfg.max_file_bytes)
    duration_s = audio.size / SAMPLE_RATE
    if sys.stderr.isatty() and duration_s >= _PROGRESS_MIN_AUDIO_S:
        from tqdm import tqdm

        with tqdm(total=round(duration_s, 1), unit="s", desc=path.name, file=sys.stderr) as bar:

            def advance(done_s: float) -> None:
                bar.update(round(min(done_s, duration_s) - bar.n, 1))

            return transcribe_recording(engine, audio, cfg, decode=decode, on_progress=advance)
    return transcribe_recording(engine, audio, cfg, decode=decode)


def cmd_transcribe(cfg: Config, args: argparse.Namespace) -> int:
    if args.output_dir is not None and not args.out_format:
        raise ConfigError("--output-dir needs --format (txt, srt, vtt or json)")
    if not args.local:
        from katydid.cli_client import transcribe_remote
        from katydid.client_resume import ResumeOptions

        # The session's options; --model names the server's model (default: the server's).
        options = {
            k: v
            for k, v in (
                ("model", args.model),
                ("language", args.language),
                ("prompt", args.prompt),
                ("task", args.task),
                ("word_timestamps", args.word_timestamps or None),
                ("api_key", args.api_key or None),
            )
            if v is not None
        }
        return transcribe_remote(
            args.files,
            args.url,
            realtime=args.realtime,
            as_json=args.json,
            options=options,
            out_format=args.out_format,
            output_dir=args.output_dir,
            resume=ResumeOptions(args.resume, args.reconnect_timeout, args.resume_buffer),
        )
    from katydid_worker.engine_options import DecodeOptions

    engine = _engine(cfg)
    decode = DecodeOptions(
        language=args.language or cfg.language,
        prompt=args.prompt,
        word_timestamps=args.word_timestamps or cfg.word_timestamps,
        translate=args.task == "translate",
    )
    failed = 0
    for path in args.files:
        try:
            tr = _transcribe_file(engine, cfg, path, decode)
        except KatydidError as exc:
            # One bad file does not stop the others; the exit code reports it.
            print(f"katydid: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.out_format:
            from katydid.cli_output import write_formatted

            body = _local_formatted(args.out_format, tr, args)
            write_formatted(path, body, args.out_format, args.output_dir)
        elif args.json:
            print(
                json.dumps(
                    {
                        "file": str(path),
                        "text": tr.text,
                        "language": tr.language,
                        "audio_s": round(tr.audio_s, 3),
                        "compute_s": round(tr.compute_s, 3),
                        "segments": [
                            {"start_s": s.start_s, "end_s": s.end_s, "text": s.text}
                            | ({"words": [asdict(w) for w in s.words]} if s.words else {})
                            for s in tr.segments
                        ],
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(tr.text if len(args.files) == 1 else f"{path}: {tr.text}")
    return 1 if failed else 0


def _local_formatted(out_format: str, tr: Transcript, args: argparse.Namespace) -> str:
    """A local transcript in the HTTP door's formats (one final per segment)."""
    from katydid.cli_output import formatted

    finals = [
        {
            "seq": i,
            "start_s": s.start_s,
            "end_s": s.end_s,
            "text": s.text,
            "language": tr.language,
            "segments": [
                {"start_s": s.start_s, "end_s": s.end_s, "text": s.text}
                | (
                    {
                        "words": [
                            {"word": w.text, "start_s": w.start_s, "end_s": w.end_s}
                            for w in s.words
                        ]
                    }
                    if s.words
                    else {}
                )
            ],
        }
        for i, s in enumerate(tr.segments)
    ]
    options = {"task": args.task or "transcribe", "word_timestamps": args.word_timestamps}
    return formatted(out_format, finals, {"audio_s": tr.audio_s}, options)


def cmd_eval(cfg: Config, args: argparse.Namespace) -> int:
    from katydid.audio import decode_container
    from katydid.evaluation import Clip, Heard, add_noise, dumps_summary, evaluate, read_manifest
    from katydid_worker.local import transcribe_recording

    clips = read_manifest(args.manifest)
    if args.url and args.snr_db is not None:
        raise KatydidError("--snr-db works with the local engine, not with --url")
    if args.url:
        from katydid.cli_client import remote_heard

        report = evaluate(clips, lambda clip: remote_heard(args.url, clip))
        print(report.table())
        if args.json:
            print(dumps_summary(report))
        return 0
    engine = _engine(cfg)

    def run(clip: Clip) -> Heard:
        audio = decode_container(
            clip.path, max_audio_s=cfg.max_audio_s, max_bytes=cfg.max_file_bytes
        )
        if args.snr_db is not None:
            audio = add_noise(audio, args.snr_db, seed=clip.name)
        tr = transcribe_recording(engine, audio, cfg)  # cut as the server cuts a file
        return Heard(tr.text, tr.audio_s, tr.compute_s)

    report = evaluate(clips, run)
    print(report.table())
    if args.json:
        print(dumps_summary(report))
    return 0
