"""``python -m tests.chaos [--out DIR] [SCENARIO ...]``: run the fault scenarios against real
processes and write ``report.md`` and ``report.json`` (``nox -s chaos`` runs it). Exits 1 if
any scenario lost work, hung, left orphan jobs or failed one of its own checks."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from katydid.config import Config
from katydid.cpu import cpu_model
from katydid.evaluation import read_manifest
from katydid.log import configure_logging
from tests.chaos.harness import Tally
from tests.chaos.resume_scenarios import RESUME_SCENARIOS
from tests.chaos.scenarios import SCENARIOS as FAULT_SCENARIOS

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = FAULT_SCENARIOS | RESUME_SCENARIOS


def _host() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _markdown(tallies: list[Tally], host: str, command: str) -> str:
    lines = [
        "# Chaos report",
        "",
        f"Host: {host}. Command: `{command}`. {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| scenario | sessions | done | finals | coded errors | hangs | lost | orphan jobs"
        " | gateway RSS before/peak/after (MB) | s | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tallies:
        rss = "/".join(f"{t.rss_kb.get(k, 0) / 1024:.0f}" for k in ("before", "peak", "after"))
        errors = ", ".join(f"{k} {v}" for k, v in sorted(t.errors.items())) or "-"
        result = "pass" if t.passed else "FAIL: " + "; ".join(t.failures or ["lost/hang/orphan"])
        lines.append(
            f"| {t.scenario} | {t.sessions} | {t.done} | {t.finals} | {errors} | {t.hangs}"
            f" | {t.lost} | {t.orphan_jobs} | {rss} | {t.seconds:.0f} | {result} |"
        )
    lines.append("")
    for t in tallies:
        lines.append(f"**{t.scenario}**: {t.what}.")
        for kind, fates in sorted(t.hostile.items()):
            lines.append(f"- {kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(fates.items())))
        lines += [f"- {note}" for note in t.notes[:10]]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos")
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=", ".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "chaos")
    args = parser.parse_args()
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")
    configure_logging(level="warning", fmt="console")
    speech = Path(os.environ.get("KATYDID_SPEECH_DIR") or REPO.parent / "shared/data/speech")
    clips = {c.name: c for c in read_manifest(speech / "manifest.tsv")}
    model_dir = Config.load().model_dir
    subprocess.run([sys.executable, "-m", "katydid", "model", "prepare"], check=True)
    names = args.scenarios or list(SCENARIOS)
    tallies = []
    with tempfile.TemporaryDirectory(prefix="katydid-chaos-") as tmp:
        for name in names:
            root = Path(tmp) / name
            root.mkdir()
            print(f"chaos: {name} ...", flush=True)
            tally = trio.run(SCENARIOS[name], root, model_dir, clips)
            print(f"chaos: {name}: {'pass' if tally.passed else 'FAIL'} {tally.to_dict()}")
            tallies.append(tally)
    command = "nox -s chaos" + (" -- " + " ".join(args.scenarios) if args.scenarios else "")
    host = _host()
    args.out.mkdir(parents=True, exist_ok=True)
    report = _markdown(tallies, host, command)
    (args.out / "report.md").write_text(report + "\n", encoding="utf-8")
    (args.out / "report.json").write_text(
        json.dumps({"host": host, "scenarios": [t.to_dict() for t in tallies]}, indent=2) + "\n",
        encoding="utf-8",
    )
    print(report)
    return 0 if all(t.passed for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
