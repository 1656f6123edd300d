"""What every chaos scenario counts: sessions, finals, coded errors by code, hangs, lost work,
orphan jobs, hostile clients' fates, and the gateway's memory (``Tally``); the normal clients
whose sessions must survive the fault (``normal_session``); the gateway's RSS (``watch_rss``).

Definitions (the report's columns):
- lost: a normal session that ended without a coded error and without ``done`` (silence), plus
  every chunk a ``done`` session never answered (neither a final nor a chunk error). Must be 0.
- hang: a normal session with no ending at all within its deadline. Must be 0.
- orphan jobs: jobs left in the stream once every session has ended. Must be 0.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from katydid import client
from katydid.metrics import parse_text
from tests.integration.stack import Stack, http_get


@dataclass
class Tally:
    scenario: str
    what: str = ""
    sessions: int = 0
    done: int = 0
    finals: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    hangs: int = 0
    lost: int = 0
    orphan_jobs: int = 0
    hostile: dict[str, Counter[str]] = field(default_factory=dict)
    rss_kb: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # checks of the scenario that failed

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    @property
    def passed(self) -> bool:
        return not self.failures and not self.lost and not self.hangs and not self.orphan_jobs

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "what": self.what,
            "sessions": self.sessions,
            "done": self.done,
            "finals": self.finals,
            "errors": dict(self.errors),
            "hangs": self.hangs,
            "lost": self.lost,
            "orphan_jobs": self.orphan_jobs,
            "hostile": {k: dict(v) for k, v in self.hostile.items()},
            "gateway_rss_kb": self.rss_kb,
            "seconds": round(self.seconds, 1),
            "notes": self.notes,
            "failures": self.failures,
            "passed": self.passed,
        }


async def normal_session(
    tally: Tally,
    url: str,
    audio: bytes,
    *,
    fmt: str = "wav",
    realtime: bool = False,
    timeout_s: float = 300.0,
) -> client.SessionResult | None:
    """One client that does nothing wrong; its fate counted into ``tally``."""
    try:
        result = await client.transcribe(
            url,
            audio,
            fmt=fmt,
            frame_bytes=3200 if fmt == "pcm_s16le" else 256 * 1024,
            realtime=realtime,
            session_timeout_s=timeout_s,
        )
    except client.ClientError as exc:
        if exc.kind == "session_timeout":
            tally.hangs += 1
        else:
            tally.errors[f"connect:{exc.kind}"] += 1
        return None
    tally.sessions += 1
    finals = result.finals
    tally.finals += len(finals)
    errors = [e for e in result.events if e.get("type") == "error"]
    fatal = [e for e in errors if e.get("seq") is None]
    done = result.done
    for e in errors:
        tally.errors[str(e.get("code"))] += 1
    if done is not None:
        tally.done += 1
        answered = len({f["seq"] for f in finals}) + int(done.get("failed_chunks", 0))
        tally.lost += max(0, int(done["chunks"]) - answered)
    elif not fatal:
        tally.lost += 1  # closed without a word
        tally.notes.append(f"silent close {result.close_code} after {len(result.events)} events")
    return result


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def watch_rss(tally: Tally, pid: int, interval_s: float = 0.25) -> None:
    """The gateway's RSS: before (at the call), peak (until cancelled)."""
    tally.rss_kb["before"] = tally.rss_kb["peak"] = rss_kb(pid)
    while True:
        tally.rss_kb["peak"] = max(tally.rss_kb["peak"], rss_kb(pid))
        await trio.sleep(interval_s)


def gateway_metric(stack: Stack, name: str) -> float:
    status, body = http_get(stack.metrics_url + "/metrics")
    return parse_text(body).get(name, float("nan")) if status == 200 else float("nan")


async def until(predicate: Any, timeout_s: float) -> bool:
    """Poll a blocking ``predicate`` (in a thread) until true; False at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await trio.to_thread.run_sync(predicate):
            return True
        await trio.sleep(0.25)
    return False
