"""Long recordings, engine by engine: Katydid's local path (the server's cuts, one engine call per
chunk), whisper.cpp on the whole file (its own 30 s seek loop), faster-whisper int8 (beam 1 and
5), all in this process at the same thread count, interleaved file by file; and, given a server,
the same files uploaded through it.

CPU seconds, not wall time, are what an engine costs (``time.process_time``: every thread of this
process, so faster-whisper's helper threads count too); the server's engine cost is what its
workers report per job. The server's wall time from upload to ``done`` is measured beside it: with
N workers a file's chunks fan out over them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from katydid.config import Config
from katydid.errors import KatydidError
from katydid.evaluation import word_errors
from katydid_worker.engine import Engine
from katydid_worker.engine_options import EngineOptions
from katydid_worker.local import transcribe_recording
from tests.bench import compare


@dataclass(frozen=True, slots=True)
class LongFile:
    path: Path
    audio: np.ndarray  # float32 16 kHz mono
    reference: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def audio_s(self) -> float:
        return self.audio.size / 16_000


@dataclass(slots=True)
class FileScore:
    errors: int
    words: int
    cpu_s: float
    wall_s: float
    text: str

    @property
    def wer(self) -> float:
        return self.errors / self.words if self.words else 0.0


@dataclass(slots=True)
class LongRun:
    name: str
    files: dict[str, FileScore] = field(default_factory=dict)

    @property
    def wer(self) -> float:
        words = sum(f.words for f in self.files.values())
        return sum(f.errors for f in self.files.values()) / words if words else 0.0

    @property
    def cpu_s(self) -> float:
        return sum(f.cpu_s for f in self.files.values())

    @property
    def wall_s(self) -> float:
        return sum(f.wall_s for f in self.files.values())


@dataclass(frozen=True, slots=True)
class LongContender:
    """A name and a call that transcribes one whole file: (text, CPU seconds or None to take
    this process's own)."""

    name: str
    transcribe: Callable[[LongFile], tuple[str, float | None]]


def katydid_local(model_path: Path, cfg: Config) -> LongContender:
    engine = Engine(
        model_path,
        EngineOptions(language=cfg.language, threads=cfg.engine_threads, beam_size=cfg.beam_size),
    )
    return LongContender(
        "katydid local (server's cuts)",
        lambda f: (transcribe_recording(engine, f.audio, cfg).text, None),
    )


def whisper_cpp_direct(model_path: Path, threads: int) -> LongContender:
    """pywhispercpp's ``Model.transcribe`` on the whole file, its defaults but the thread count."""
    from pywhispercpp.model import Model

    model = Model(
        str(model_path),
        redirect_whispercpp_logs_to=None,
        n_threads=threads,
        print_progress=False,
        print_realtime=False,
    )

    def transcribe(f: LongFile) -> tuple[str, float | None]:
        return " ".join(s.text for s in model.transcribe(f.audio, language="en")).strip(), None

    return LongContender("whisper.cpp direct (whole file)", transcribe)


def faster_whisper(ct2_dir: Path, threads: int, beam_sizes: Sequence[int]) -> list[LongContender]:
    """compare.faster_whisper's contenders, each given a whole file."""

    def whole(c: compare.Contender) -> LongContender:
        return LongContender(c.name, lambda f: (c.transcribe(f.audio).strip(), None))

    return [
        whole(c) for c in compare.faster_whisper(ct2_dir, threads=threads, beam_sizes=beam_sizes)
    ]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and all its descendants (Linux /proc), children that have
    exited included where their parent waited for them."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            # utime, stime, cutime, cstime: fields 14-17 of stat, 11-14 after the name
            total += sum(int(v) for v in stats[p][11:15]) / tick
        todo += children.get(p, [])
    return total


def through_server(url: str, server_pid: int) -> LongContender:
    """Each file uploaded whole over the native WebSocket; its CPU is the server's (gateway,
    NATS and workers: every process under ``server_pid``) while it was transcribed."""
    import trio

    from katydid import client

    def transcribe(f: LongFile) -> tuple[str, float | None]:
        before = tree_cpu_s(server_pid)
        res = trio.run(
            lambda: client.transcribe(url, f.path.read_bytes(), fmt="wav", session_timeout_s=900)
        )
        if res.done is None:
            raise KatydidError(f"{f.name}: the server did not finish it (close {res.close_code})")
        return res.text, tree_cpu_s(server_pid) - before

    return LongContender("katydid serve (upload, all its processes)", transcribe)


def measure(contenders: Sequence[LongContender], files: Sequence[LongFile]) -> list[LongRun]:
    """Every contender on every file, interleaved (file by file, the order rotating), so that
    this machine's drift from minute to minute falls on all of them alike."""
    runs = {c.name: LongRun(c.name) for c in contenders}
    for i, f in enumerate(files):
        turn = i % len(contenders)
        for c in [*contenders[turn:], *contenders[:turn]]:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            text, cpu_s = c.transcribe(f)
            wall_s = time.perf_counter() - wall0
            errors, words = word_errors(f.reference, text)
            runs[c.name].files[f.name] = FileScore(
                errors,
                words,
                cpu_s if cpu_s is not None else time.process_time() - cpu0,
                wall_s,
                text,
            )
    return [runs[c.name] for c in contenders]


def markdown(runs: Sequence[LongRun], files: Sequence[LongFile], host: str) -> str:
    """The report: pooled figures per contender, then WER per file."""
    audio_s = sum(f.audio_s for f in files)
    fw1 = next((r for r in runs if r.name.endswith("beam 1")), None)
    lines = [
        f"Host: {host}. {len(files)} files, {audio_s:.1f} s of audio.",
        "",
        "| contender | pooled WER | worst file WER | CPU s | CPU s per audio s | vs faster-whisper beam 1 | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        ratio = f"{r.cpu_s / fw1.cpu_s:.2f}x" if fw1 and fw1.cpu_s else "-"
        worst = max((f.wer for f in r.files.values()), default=0.0)
        lines.append(
            f"| {r.name} | {100 * r.wer:.2f}% | {100 * worst:.1f}% | {r.cpu_s:.1f} | "
            f"{r.cpu_s / audio_s:.4f} | {ratio} | {r.wall_s:.1f} |"
        )
    lines += ["", "| file | audio s | " + " | ".join(r.name for r in runs) + " |"]
    lines.append("|---|---:|" + "---:|" * len(runs))
    for f in files:
        cells = [f"{100 * r.files[f.name].wer:.1f}%" for r in runs]
        lines.append(f"| {f.name} | {f.audio_s:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
