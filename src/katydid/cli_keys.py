"""``katydid keys add|list|revoke``: the API keys file (``api_keys_file``).

A running gateway picks up the change by itself within a second (or at once on SIGHUP).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from katydid.config import Config
from katydid.errors import ConfigError
from katydid.keys import add_key, read_keys, revoke_key


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser(
        "keys", help="API keys: add, list, revoke (the file of api_keys_file)"
    ).add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = keys.add_parser("add", help="make a key; it is printed once, alone on the last line")
    add.add_argument("name", help="the key's name (in logs and metrics; never the key)")
    add.add_argument("--max-sessions", type=int, help="sessions open at once (per gateway)")
    add.add_argument("--audio-s-per-hour", type=float, help="audio seconds per hour (per gateway)")
    add.add_argument(
        "--max-queued-jobs",
        type=int,
        help="its jobs in the queue at once; more wait seated in the gateway (fair share)",
    )
    keys.add_parser("list", help="names, limits, created, revoked (never the keys)")
    revoke = keys.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("name")
    for parser in (add, revoke, *keys.choices.values()):
        if not any(a.dest == "keys_file" for a in parser._actions):
            parser.add_argument(
                "--keys-file", type=Path, help="default: api_keys_file (KATYDID_API_KEYS_FILE)"
            )


def cmd_keys(cfg: Config, args: argparse.Namespace) -> int:
    path = args.keys_file or (Path(cfg.api_keys_file).expanduser() if cfg.api_keys_file else None)
    if path is None:
        raise ConfigError(
            "no keys file: set api_keys_file in the config, KATYDID_API_KEYS_FILE, or --keys-file"
        )
    if args.keys_command == "add":
        key = add_key(
            path,
            args.name,
            max_sessions=args.max_sessions,
            audio_s_per_hour=args.audio_s_per_hour,
            max_queued_jobs=args.max_queued_jobs,
        )
        print(f"added key {args.name!r} to {path}; it is shown only now:", file=sys.stderr)
        print(key)
    elif args.keys_command == "revoke":
        revoke_key(path, args.name)
        print(f"revoked {args.name!r} (a running gateway refuses it within a second)")
    else:
        if not path.exists():
            # A gateway pointed at it would refuse to start: not "no keys".
            raise ConfigError(f"no keys file at {path} (katydid keys add makes it)")
        records = read_keys(path)
        if not records:
            print(f"no keys in {path}")
        for r in records.values():
            limits = [
                f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                for k in ("max_sessions", "audio_s_per_hour", "max_queued_jobs")
                if (v := getattr(r, k)) is not None
            ]
            state = f"revoked {r.revoked}" if r.revoked else "active"
            print(f"{r.name}\t{state}\tcreated {r.created}\t{' '.join(limits) or 'no limits'}")
    return 0
