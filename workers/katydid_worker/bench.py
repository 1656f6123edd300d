"""Engine baseline: the raw engine in N processes on the same clips, no gateway, no NATS.

What the load report divides by: end-to-end throughput as a fraction of what the same number of
engine processes can do alone on this machine, measured in the same run.

Each process loads its model (not timed), waits at a barrier, then transcribes clips back to
back until ``duration_s`` has passed (finishing the clip in hand), and reports clips, audio
seconds and its own elapsed time.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from katydid.messages import SAMPLE_RATE
from katydid_worker.engine import Engine, EngineOptions


@dataclass(frozen=True, slots=True)
class BenchResult:
    """Totals, and rates summed over processes (each process's own count over its own time)."""

    processes: int
    clips: int
    audio_s: float
    wall_s: float  # the longest process's elapsed time
    clips_per_s: float
    audio_s_per_s: float

    def as_dict(self) -> dict[str, float]:
        return {
            "processes": self.processes,
            "clips": self.clips,
            "audio_s": round(self.audio_s, 2),
            "wall_s": round(self.wall_s, 2),
            "clips_per_s": round(self.clips_per_s, 3),
            "audio_s_per_s": round(self.audio_s_per_s, 3),
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
    engine = Engine(Path(model_path), options)
    engine.transcribe(clips[index % len(clips)][:SAMPLE_RATE])  # warm caches before the clock
    barrier.wait()
    started = time.perf_counter()
    n, audio = 0, 0.0
    i = index
    while time.perf_counter() - started < duration_s:
        clip = clips[i % len(clips)]
        engine.transcribe(clip)
        n += 1
        audio += clip.size / SAMPLE_RATE
        i += 1
    out.put((n, audio, time.perf_counter() - started))


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
    results = [out.get(timeout=duration_s + 600) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return BenchResult(
        processes=processes,
        clips=sum(r[0] for r in results),
        audio_s=sum(r[1] for r in results),
        wall_s=max(r[2] for r in results),
        clips_per_s=sum(r[0] / r[2] for r in results),
        audio_s_per_s=sum(r[1] / r[2] for r in results),
    )
