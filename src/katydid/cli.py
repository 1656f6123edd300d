"""The ``katydid`` command: its entry point (``main``), which hands each subcommand to its module.

This module is the composition root: it builds the Config, configures logging once and wires
the parts together. Errors of the KatydidError tree become a one-line message and exit code 1.
The parser is ``cli_parser``; the commands are ``cli_model`` (model), ``cli_transcribe``
(transcribe, eval; ``cli_client`` through a server), ``cli_servers`` (serve, gateway, worker,
nats), ``cli_keys`` and ``cli_load``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from katydid import native_stderr
from katydid.cli_parser import build_parser
from katydid.config import Config
from katydid.errors import KatydidError
from katydid.log import configure_logging


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


def _reader_gone() -> int:
    """The reader of stdout went away (`katydid nats status | head -2`): nothing more to say to
    it. Further writes to stdout, at exit too, go nowhere instead of raising again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # as a shell reports a command killed by SIGPIPE


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``katydid`` console script."""
    args = build_parser().parse_args(argv)
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
            from katydid import cli_model

            return cli_model.cmd_model(cfg, args)
        if args.command == "transcribe":
            from katydid import cli_transcribe

            return cli_transcribe.cmd_transcribe(cfg, args)
        if args.command == "eval":
            from katydid import cli_transcribe

            return cli_transcribe.cmd_eval(cfg, args)
        if args.command in ("serve", "gateway", "worker", "nats"):
            from katydid import cli_servers

            return cli_servers.run_server_command(cfg, args)
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
        if all(isinstance(leaf, BrokenPipeError) for leaf in _leaves(errors)):
            return _reader_gone()
        for leaf in _leaves(errors):
            print(f"katydid: error: {leaf}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except OSError as exc:
        # The system refused something (a port in use, an address not here, a data directory
        # that is a file or not writable): in words, as it said it.
        print(f"katydid: error: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover
