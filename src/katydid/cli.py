"""The ``katydid`` command: subcommands for models, local transcription and evaluation.

This module is the composition root: it builds the Config, configures logging once and wires
the parts together. Errors of the KatydidError tree become a one-line message and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from katydid import __version__, native_stderr
from katydid.config import Config
from katydid.errors import ConfigError, KatydidError
from katydid.log import configure_logging

if TYPE_CHECKING:
    from katydid_worker.engine import Engine
    from katydid_worker.engine_options import DecodeOptions
    from katydid_worker.transcript import Transcript

log = structlog.get_logger("katydid.cli")
_PROGRESS_MIN_AUDIO_S = 30.0


class _Version(argparse.Action):
    """``--version``: the package's version and how whisper.cpp was built (compiler, SIMD
    levels, llamafile kernels), looked up only when asked (it loads the engine's library)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kw: Any) -> None:
        try:
            from katydid_worker.engine_build import build_info

            build = build_info()
        except ImportError as exc:  # a gateway-only install has no engine
            build = f"no engine ({exc})"
        print(f"katydid {__version__}\nwhisper.cpp build: {build}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: with prefix matching, a subcommand's option (`load --mode`) was taken
    # for an abbreviation of a top-level one (`--model`, `--model-dir`) and refused.
    p = argparse.ArgumentParser(
        prog="katydid", description="Katydid speech-to-text server.", allow_abbrev=False
    )
    p.add_argument("--version", action=_Version, help="show the version and the engine build")
    p.add_argument("--config", type=Path, help="TOML config file (default: $KATYDID_CONFIG)")
    p.add_argument(
        "--model", help="model name or ggml file (default: config 'model', tiny.en-q8_0)"
    )
    p.add_argument("--model-dir", type=Path, help="prepared-model cache directory")
    p.add_argument("--threads", type=int, dest="engine_threads", help="engine threads per model")
    p.add_argument("--log-format", choices=("auto", "json", "console"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="prepare and list speech models").add_subparsers(
        dest="model_command", required=True, metavar="ACTION"
    )
    prep = model.add_parser(
        "prepare", help="convert a packaged model into the cache (no-op if done)"
    )
    prep.add_argument("name", nargs="?", help="model name (default: the configured model)")
    model.add_parser("list", help="show known models and whether they are installed and prepared")

    tr = sub.add_parser("transcribe", help="transcribe audio files")
    tr.add_argument("files", nargs="+", type=Path, metavar="FILE")
    tr.add_argument(
        "--local", action="store_true", help="use the engine in this process (no server)"
    )
    tr.add_argument("--json", action="store_true", help="JSON output (with --url: event lines)")
    tr.add_argument("--url", default="ws://127.0.0.1:8765", help="gateway URL (%(default)s)")
    tr.add_argument("--realtime", action="store_true", help="pace audio like a microphone")
    tr.add_argument(
        "--api-key",
        default=os.environ.get("KATYDID_API_KEY"),
        help="the server's API key, if it needs one (default: KATYDID_API_KEY)",
    )
    tr.add_argument("--language", help="a language code, or auto (multilingual models)")
    tr.add_argument("--prompt", help="initial prompt: spellings, names, style")
    tr.add_argument("--task", choices=("transcribe", "translate"), help="translate: into English")
    tr.add_argument("--word-timestamps", action="store_true", help="words with times (--json)")
    tr.add_argument(
        "--format",
        dest="out_format",
        choices=("txt", "srt", "vtt", "json"),
        help="print the whole transcript in this format at the end (json: as the HTTP door's"
        " verbose_json); default: each utterance as it arrives",
    )
    tr.add_argument(
        "--output-dir",
        type=Path,
        help="with --format: write each file's transcript to DIR/NAME.FORMAT (made if missing)"
        " instead of printing it: several files' SRTs printed one after another are one bad SRT",
    )

    ev = sub.add_parser("eval", help="WER and speed on a manifest of clips with references")
    ev.add_argument("manifest", type=Path)
    ev.add_argument(
        "--json", action="store_true", help="print the summary as JSON on the last line"
    )
    ev.add_argument("--url", help="evaluate through a running server instead of the local engine")
    ev.add_argument(
        "--snr-db",
        type=float,
        help="add white noise at this signal-to-noise ratio (dB) to every clip (local engine)",
    )

    def server_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--host", help="listen address (default 127.0.0.1)")
        sp.add_argument("--port", type=int, help="WebSocket port (default 8765; 0 = a free port)")
        sp.add_argument("--nats-url", help="the NATS server (serve: instead of its embedded one)")
        sp.add_argument(
            "--http-port",
            "--metrics-port",  # its name before the HTTP door served more than metrics
            dest="http_port",
            type=int,
            help="HTTP door: OpenAI-compatible API, /metrics, /healthz, /readyz "
            "(default: a free port, printed; -1 = off)",
        )
        sp.add_argument(
            "--wyoming-port",
            type=int,
            help="Wyoming door for Home Assistant (usually 10300; default off; 0 = a free port)",
        )
        sp.add_argument(
            "--api-keys-file",
            "--keys-file",  # the name `katydid keys` takes: the README's first guess
            dest="api_keys_file",
            help="require API keys from this file (katydid keys add); default: open to all",
        )

    sv = sub.add_parser("serve", help="run everything: embedded nats-server, gateway, workers")
    server_flags(sv)
    sv.add_argument(
        "--workers",
        type=_workers_flag,
        help="worker processes: N of the default model (default: one per core), or"
        " MODEL=N,MODEL=N (e.g. tiny.en-q8_0=2,base=1)",
    )
    sv.add_argument("--data-dir", type=Path, help="data directory (NATS store)")
    server_flags(sub.add_parser("gateway", help="run the WebSocket gateway alone (needs NATS)"))
    wk = sub.add_parser("worker", help="run one whisper.cpp worker process (needs NATS)")
    wk.add_argument("--nats-url")
    wk.add_argument("--worker-id")
    nats = sub.add_parser("nats", help="NATS administration").add_subparsers(
        dest="nats_command", required=True, metavar="ACTION"
    )
    setup = nats.add_parser("setup", help="create or update the job stream and consumers")
    st = nats.add_parser("status", help="the job stream, its consumers and the live workers")
    for action in (setup, st):
        action.add_argument("--nats-url", help="default: the NATS of `katydid serve` here")
        action.add_argument(
            "--data-dir",
            type=Path,
            help="serve's data directory: its NATS URL and admin credentials, where none are set",
        )
    st.add_argument("--json", action="store_true", help="one JSON object")
    from katydid import cli_keys, cli_load

    cli_load.add_parsers(sub)
    cli_keys.add_parsers(sub)
    return p


def _workers_flag(value: str) -> int | str:
    """``--workers 2`` or ``--workers tiny.en-q8_0=2,base=1`` (checked by Config)."""
    text = value.strip()
    return int(text) if text.lstrip("-").isdigit() else value


def _config(args: argparse.Namespace) -> Config:
    workers = getattr(args, "workers", None)
    return Config.load(
        args.config,
        overrides={
            "model": args.model,
            "model_dir": args.model_dir,
            "engine_threads": args.engine_threads,
            "log_format": args.log_format,
            "log_level": args.log_level,
            **{
                k: getattr(args, k, None)
                for k in (
                    "host",
                    "port",
                    "nats_url",
                    "data_dir",
                    "http_port",
                    "wyoming_port",
                    "api_keys_file",
                )
            },
            "workers": workers if isinstance(workers, int) else None,
            "worker_models": workers if isinstance(workers, str) else None,
        },
    )


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
        ),
    )


def _cmd_model(cfg: Config, args: argparse.Namespace) -> int:
    from katydid_worker import models

    if args.model_command == "prepare":
        name = args.name or cfg.model
        path = models.prepare(cfg.model_dir, name, progress=lambda msg: print(msg, file=sys.stderr))
        print(path)
        return 0
    print(f"{'model':<14} {'installed':<10} {'prepared':<9} {'languages':<10} path")
    for st in models.statuses(cfg.model_dir):
        langs = "en" if st.english_only else "99"
        print(
            f"{st.name:<14} {'yes' if st.installed else 'no':<10} {'yes' if st.prepared else 'no':<9} {langs:<10} {st.path}"
        )
    return 0


def _transcribe_file(
    engine: Engine, cfg: Config, path: Path, decode: DecodeOptions | None = None
) -> Transcript:
    from katydid.audio import decode_container
    from katydid_worker.local import transcribe_recording

    audio = decode_container(path, max_audio_s=cfg.max_audio_s, max_bytes=cfg.max_file_bytes)
    duration_s = audio.size / 16_000
    if sys.stderr.isatty() and duration_s >= _PROGRESS_MIN_AUDIO_S:
        from tqdm import tqdm

        with tqdm(total=round(duration_s, 1), unit="s", desc=path.name, file=sys.stderr) as bar:

            def advance(done_s: float) -> None:
                bar.update(round(min(done_s, duration_s) - bar.n, 1))

            return transcribe_recording(engine, audio, cfg, decode=decode, on_progress=advance)
    return transcribe_recording(engine, audio, cfg, decode=decode)


def _cmd_transcribe(cfg: Config, args: argparse.Namespace) -> int:
    if args.output_dir is not None and not args.out_format:
        raise ConfigError("--output-dir needs --format (txt, srt, vtt or json)")
    if not args.local:
        from katydid.cli_remote import transcribe_remote

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
            from katydid.cli_remote import write_formatted

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
    from katydid.cli_remote import formatted

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


def _cmd_eval(cfg: Config, args: argparse.Namespace) -> int:
    from katydid.audio import decode_container
    from katydid.evaluation import Clip, Heard, add_noise, dumps_summary, evaluate, read_manifest
    from katydid_worker.local import transcribe_recording

    clips = read_manifest(args.manifest)
    if args.url and args.snr_db is not None:
        raise KatydidError("--snr-db works with the local engine, not with --url")
    if args.url:
        from katydid.cli_remote import remote_heard

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


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``katydid`` console script."""
    args = _parser().parse_args(argv)
    try:
        cfg = _config(args)
        if args.command == "serve" and args.config is not None:
            # Its workers are processes of their own: they read the same file.
            os.environ["KATYDID_CONFIG"] = str(args.config.resolve())
        if args.command in ("serve", "gateway"):
            # Native libraries' stderr lines (a decoder's, per bad upload) are sampled log lines.
            native_stderr.capture()
        configure_logging(level=cfg.log_level, fmt=cfg.log_format)
        if args.command == "model":
            return _cmd_model(cfg, args)
        if args.command == "transcribe":
            return _cmd_transcribe(cfg, args)
        if args.command == "eval":
            return _cmd_eval(cfg, args)
        if args.command in ("serve", "gateway", "worker", "nats"):
            from katydid import cli_remote

            return cli_remote.run_server_command(cfg, args)
        if args.command == "keys":
            from katydid import cli_keys

            return cli_keys.cmd_keys(cfg, args)
        if args.command == "load":
            from katydid import cli_load

            return cli_load.cmd_load(cfg, args)
    except KatydidError as exc:
        print(f"katydid: error: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # Raised inside a nursery (nats-server exiting under `serve`, a port in use): said in
        # words, as above, not as a traceback; anything else in the group is a bug, and shows
        # as one.
        errors, rest = group.split((KatydidError, OSError))
        if errors is None or rest is not None:
            raise
        for leaf in _leaves(errors):
            print(f"katydid: error: {leaf}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`katydid nats status | head -2`): nothing more to say to it.
        # Further writes to stdout, at exit too, go nowhere instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command killed by SIGPIPE
    except OSError as exc:
        # The system refused something (a port in use, an address not here, a data directory
        # that is a file or not writable): in words, as it said it.
        print(f"katydid: error: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover
