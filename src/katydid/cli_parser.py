"""The ``katydid`` command line's parser: the top-level options and every subcommand's (``load``
and ``keys`` add their own, ``cli_load.add_parsers``, ``cli_keys.add_parsers``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from katydid import __version__

# The converter's weight formats (katydid_worker.ggml.QUANTS, not imported here: the parser
# loads no engine code).
MODEL_QUANTS = ("f16", "q8_0", "q4_0")


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


def build_parser() -> argparse.ArgumentParser:
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
    pull = model.add_parser(
        "pull", help="fetch one of whisper.cpp's published ggml models into the cache"
    )
    pull.add_argument("name", help="tiny, base.en, small-q5_1, large-v3-turbo, ... (model list)")
    pull.add_argument(
        "--endpoint",
        help="the hub or a mirror of it (default: $HF_ENDPOINT, else https://huggingface.co)",
    )
    imp = model.add_parser(
        "import", help="bring a ggml file or a faster-whisper (CTranslate2) directory"
    )
    imp.add_argument("path", type=Path, metavar="PATH")
    imp.add_argument(
        "--name", help="the name to use it by (default: the file's, without ggml- and .bin)"
    )
    imp.add_argument(
        "--quant",
        choices=MODEL_QUANTS,
        help="a CTranslate2 directory's weight format in the cache (default f16)",
    )

    tr = sub.add_parser("transcribe", help="transcribe audio files")
    tr.add_argument("files", nargs="+", type=Path, metavar="FILE")
    tr.add_argument(
        "--local", action="store_true", help="use the engine in this process (no server)"
    )
    tr.add_argument("--json", action="store_true", help="JSON output (with --url: event lines)")
    tr.add_argument("--url", default="ws://127.0.0.1:8765", help="gateway URL (%(default)s)")
    tr.add_argument("--realtime", action="store_true", help="pace audio like a microphone")
    tr.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="end the session when the connection is lost (default: reconnect and resume it)",
    )
    tr.add_argument(
        "--reconnect-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long to try to resume a lost connection (%(default)s s)",
    )
    tr.add_argument(
        "--resume-buffer",
        type=float,
        default=300.0,
        metavar="S",
        help="with --realtime: seconds of recent audio kept to resend on a resume (%(default)s)",
    )
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
