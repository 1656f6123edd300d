"""Engine baseline: the raw engine in N processes on the same clips, no gateway, no NATS.

What the load report divides by: end-to-end throughput as a fraction of what the same number of
engine processes can do alone on this machine, measured in the same run.

Each process loads its model (not timed), waits at a barrier, then transcribes clips back to
back until ``duration_s`` has passed (finishing the clip in hand) and it has done every clip
once, and reports clips, audio seconds, its own elapsed time and each clip's time. Per clip because a clip's cost per audio
second varies fourfold (a clip whose clip-sized run falls back pays for two runs), so a rate over
one mix of clips is no baseline for another: the load report weighs these times by the clips
its sessions sent.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from katydid.audio import SAMPLE_RATE
from katydid.errors import EngineError
from katydid_worker.engine import Engine
from katydid_worker.engine_options import EngineOptions

_START_TIMEOUT_S = 600.0  # to load the model and warm up, per process


@dataclass(frozen=True, slots=True)
class BenchResult:
    """Totals, and rates summed over processes (each process's own count over its own time)."""

    processes: int
    clips: int
    audio_s: float
    wall_s: float  # the longest process's elapsed time
    clips_per_s: float
    audio_s_per_s: float
    # Mean seconds one process took per clip, in the order given (None: never reached).
    clip_s: tuple[float | None, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "processes": self.processes,
            "clips": self.clips,
            "audio_s": round(self.audio_s, 2),
            "wall_s": round(self.wall_s, 2),
            "clips_per_s": round(self.clips_per_s, 3),
            "audio_s_per_s": round(self.audio_s_per_s, 3),
            "clip_s": [None if t is None else round(t, 4) for t in self.clip_s],
        }


def _run_one(
    index: int,
    model_path: str,
    options: EngineOptions,
    clips: list[np.ndarray],
    duration_s: float,
    barrier: Any,
    out: Any,
) -> None:
    try:
        engine = Engine(Path(model_path), options)
        engine.transcribe(clips[index % len(clips)][:SAMPLE_RATE])  # warm before the clock
        barrier.wait(timeout=_START_TIMEOUT_S)
    except Exception as exc:
        barrier.abort()  # the others stop waiting for this one
        out.put(f"engine process {index}: {type(exc).__name__}: {exc}")
        return
    started = time.perf_counter()
    n, audio = 0, 0.0
    i = index
    times: dict[int, list[float]] = {}
    # Every clip at least once, however slow the host: the load report weighs them all.
    while (t0 := time.perf_counter()) - started < duration_s or i - index < len(clips):
        clip = clips[i % len(clips)]
        engine.transcribe(clip)
        times.setdefault(i % len(clips), []).append(time.perf_counter() - t0)
        n += 1
        audio += clip.size / SAMPLE_RATE
        i += 1
    out.put((n, audio, time.perf_counter() - started, times))


_Report = tuple[int, float, float, dict[int, list[float]]]


def _collect(procs: list[Any], out: Any, timeout_s: float) -> list[_Report]:
    """Each process's totals; a process that failed or died is an error at once, not a wait
    for the timeout (the load report waited 10 minutes on an engine that could not start).

    Raises:
        EngineError: a process failed, died, or did not report within ``timeout_s``.
    """
    results: list[_Report] = []
    deadline = time.monotonic() + timeout_s
    while len(results) < len(procs):
        try:
            got = out.get(timeout=1.0)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise EngineError(f"an engine process died (exit code {dead[0]})") from None
            if time.monotonic() > deadline:
                raise EngineError(
                    f"the engine processes did not report in {timeout_s:.0f} s"
                ) from None
            continue
        if isinstance(got, str):
            raise EngineError(f"the engine baseline failed: {got}")
        results.append(got)
    return results


def bench_engine(
    model_path: Path,
    clips: Sequence[np.ndarray],
    *,
    processes: int,
    duration_s: float,
    options: EngineOptions | None = None,
) -> BenchResult:
    """Run the engine in ``processes`` processes for about ``duration_s`` each.

    Returns:
        Clips and audio seconds done, over the longest process's elapsed time.
    """
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes)
    out = ctx.Queue()
    opts = options or EngineOptions()
    procs = [
        ctx.Process(
            target=_run_one, args=(i, str(model_path), opts, list(clips), duration_s, barrier, out)
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        results = _collect(procs, out, duration_s + _START_TIMEOUT_S)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    per_clip: dict[int, list[float]] = {}
    for r in results:
        for index, times in r[3].items():
            per_clip.setdefault(index, []).extend(times)
    return BenchResult(
        processes=processes,
        clips=sum(r[0] for r in results),
        audio_s=sum(r[1] for r in results),
        wall_s=max(r[2] for r in results),
        clips_per_s=sum(r[0] / r[2] for r in results),
        audio_s_per_s=sum(r[1] / r[2] for r in results),
        clip_s=tuple(
            sum(per_clip[i]) / len(per_clip[i]) if i in per_clip else None
            for i in range(len(clips))
        ),
    )
