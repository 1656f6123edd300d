"""The load report: one JSON object and a Markdown page (and a PNG plot if matplotlib is there).

Everything in it was measured in this run, on this machine; the command line that produced it
is part of it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from katydid.cpu import cpu_model
from katydid.load.runner import LoadStats


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(ordered[-1], 3)}


def _rates(timeline: Sequence[dict[str, float]], key: str) -> list[float]:
    """Per-interval rate of a cumulative series (per second)."""
    out = []
    for a, b in itertools.pairwise(timeline):
        if key in a and key in b and b["t"] > a["t"]:
            out.append(max(0.0, (b[key] - a[key]) / (b["t"] - a["t"])))
    return out


def engine_on_mix(
    clip_s: Sequence[float | None],
    clip_audio_s: Sequence[float],
    counts: Sequence[int],
    processes: int,
) -> float | None:
    """Audio seconds per second that ``processes`` engines alone would do on the load's own mix:
    clip ``i`` sent ``counts[i]`` times, one engine taking ``clip_s[i]`` seconds for it. None if
    the mix has a clip the engine was never timed on. (A rate over the bench's even mix is no
    baseline for a load that sent the slow clips more often: in the seed scenario the clients'
    order gave a mix 3-6% slower per audio second.)"""
    seconds = audio = 0.0
    for t, a, n in zip(clip_s, clip_audio_s, counts, strict=True):
        if not n:
            continue
        if t is None:
            return None
        seconds += n * t
        audio += n * a
    return audio / (seconds / processes) if seconds > 0 else None


def summarize(
    stats: LoadStats,
    *,
    command: str,
    engine: dict[str, float] | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    spec = stats.spec
    ok = [r for r in stats.records if r.outcome == "ok"]
    audio_s = sum(r.audio_s for r in ok)
    first = min((r.started_s for r in stats.records), default=0.0)
    last = max((r.finished_s for r in ok), default=first)
    busy_s = max(1e-9, last - first)
    tl = stats.timeline
    gw_cpu = [100 * r for r in _rates(tl, "gateway_cpu_s")]
    wk_cpu = [100 * r for r in _rates(tl, "workers_cpu_s")]
    loader_cpu = [100 * r for r in _rates(tl, "loader_cpu_s")]
    host_busy = [100 * r for r in _rates(tl, "host_busy_s")]
    host_steal = [100 * r for r in _rates(tl, "host_steal_s")]
    log_rate = _rates(tl, "gateway_log_lines")
    # The gateway's peak gauge is since its start: this run's only if it had none before the
    # run (an earlier run's 10,010 connections were reported as this one's); else the most
    # connections it reported open during the run.
    sampled = [p for p in tl if "gateway_peak" in p]
    fresh = bool(sampled) and sampled[0].get("gateway_peak", 0.0) <= 0.0
    peak_gateway = max(
        (p.get("gateway_peak" if fresh else "gateway_active", 0.0) for p in sampled),
        default=0.0,
    )
    rss = [p["gateway_rss"] for p in tl if "gateway_rss" in p]
    rss_idle = rss[0] if rss else None
    rss_peak = max(rss) if rss else None
    peak = int(peak_gateway) or stats.peak_active_client
    throughput = audio_s / busy_s
    return {
        "command": command,
        "machine": {
            "cores": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
        },
        "mode": spec.mode,
        "concurrency": spec.concurrency,
        "duration_s": spec.duration_s,
        "ramp_s": spec.ramp_s,
        "drain_s": spec.drain_s,
        "workers": workers,
        "attempts": stats.attempts,
        "sessions": len(stats.records),
        "completed": len(ok),
        "errors": stats.errors,
        "errors_by_code": dict(stats.errors_by_code),
        "errors_by_kind": dict(stats.errors_by_kind),
        "overloaded": stats.overloaded,
        "not_retried_after_end": stats.not_retried_after_end,
        "peak_active_connections": peak,
        "peak_active_connections_client": stats.peak_active_client,
        "latency_s": {
            "connect": percentiles([r.connect_s for r in ok]),
            "time_in_queue": percentiles([r.queue_s for r in ok]),
            "first_final": percentiles(
                [r.first_final_s for r in ok if r.first_final_s is not None]
            ),
            "total": percentiles([r.total_s for r in ok]),
        },
        "throughput_sessions_per_s": round(len(ok) / busy_s, 3),
        "throughput_audio_s_per_s": round(throughput, 3),
        "busy_window_s": round(busy_s, 2),
        "audio_s_transcribed": round(audio_s, 2),
        "engine_audio_s_per_s": engine.get("audio_s_per_s") if engine else None,
        "engine_even_mix_audio_s_per_s": engine.get("even_mix_audio_s_per_s") if engine else None,
        "engine_weighted_by_load_mix": engine.get("weighted_by_load_mix") if engine else None,
        # Measured before and after the load (their mean is the figure above), when both were.
        "engine_before_after": [engine["before_audio_s_per_s"], engine["after_audio_s_per_s"]]
        if engine and "after_audio_s_per_s" in engine
        else None,
        "engine_ratio": round(throughput / engine["audio_s_per_s"], 3)
        if engine and engine.get("audio_s_per_s")
        else None,
        "gateway_cpu_percent": {"mean": _mean(gw_cpu), "max": _max(gw_cpu)},
        "gateway_rss_bytes": {"start": rss_idle, "peak": rss_peak},
        "gateway_rss_bytes_per_connection": round((rss_peak - rss_idle) / peak, 1)
        if rss_peak and rss_idle and peak
        else None,
        "workers_cpu_percent": {"mean": _mean(wk_cpu), "max": _max(wk_cpu)},
        "load_generator_cpu_percent": {"mean": _mean(loader_cpu), "max": _max(loader_cpu)},
        "host_cpu_busy_percent": {"mean": _mean(host_busy), "max": _max(host_busy)},
        "host_cpu_steal_percent": {"mean": _mean(host_steal), "max": _max(host_steal)},
        "gateway_log_lines_per_s": {"mean": _mean(log_rate), "max": _max(log_rate)},
        "queued_updates_per_session": {
            "mean": _mean([float(r.status_updates) for r in ok]),
            "max": _max([float(r.status_updates) for r in ok]),
        },
        "gateway_log_lines_suppressed": max(
            (p.get("gateway_log_suppressed", 0.0) for p in tl), default=0.0
        ),
        "resume": _resume_summary(stats),
        "wall_s": round(stats.wall_s, 2),
        "timeline": tl,
        "latency_timeline": [[round(r.finished_s, 2), round(r.total_s, 2)] for r in ok],
    }


def _resume_summary(stats: LoadStats) -> dict[str, Any]:
    """--drop-rate: sessions reset, resumes, and the finals of completed sessions (each of lost,
    duplicated and out of order must be 0); reconnect -> first result after it (the client's
    backoff excluded; a partial counts), and loss -> next final for scale, in seconds."""
    ok = [r for r in stats.records if r.outcome == "ok"]
    return {
        "drop_rate": stats.spec.drop_rate,
        "sessions_dropped": sum(r.dropped for r in stats.records),
        "resumes": sum(r.resumes for r in stats.records),
        "finals_lost": sum(r.finals_lost for r in ok),
        "finals_duplicated": sum(r.finals_duplicated for r in ok),
        "finals_out_of_order": sum(r.finals_out_of_order for r in ok),
        "reconnect_to_result_s": percentiles([t for r in ok for t in r.resume_latencies_s]),
        "loss_to_next_final_s": percentiles([t for r in ok for t in r.outage_to_final_s]),
    }


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 2) if xs else None


def _max(xs: Sequence[float]) -> float | None:
    return round(max(xs), 2) if xs else None


def markdown(s: dict[str, Any]) -> str:
    lat = s["latency_s"]

    def row(name: str, p: dict[str, float | None]) -> str:
        return f"| {name} | {p['p50']} | {p['p90']} | {p['p99']} | {p['max']} |"

    mb = 1024 * 1024
    rss = s["gateway_rss_bytes"]
    mix = {
        True: ", in the load's mix of them",
        False: ", in the bench's even mix: it did not time every clip the load sent",
        None: "",
    }[s.get("engine_weighted_by_load_mix")]
    lines = [
        f"# Katydid load report: {s['mode']}, {s['concurrency']} clients, {s['duration_s']:.0f} s",
        "",
        f"Command: `{s['command']}`",
        f"Machine: {s['machine']['cores']} cores, {s['machine']['cpu']}, Python {s['machine']['python']}; workers: {s['workers']}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| attempts | {s['attempts']} |",
        f"| sessions started | {s['sessions']} |",
        f"| completed sessions | {s['completed']} |",
        f"| **errors** | **{s['errors']}** |",
        f"| errors by kind | {s['errors_by_kind'] or '-'} |",
        f"| errors by code | {s['errors_by_code'] or '-'} |",
        f"| overloaded (refused with retry_after, retried) | {s['overloaded']} |",
        f"| not retried because the duration ended | {s['not_retried_after_end']} |",
        f"| peak active connections (gateway) | {s['peak_active_connections']} |",
        f"| throughput | {s['throughput_sessions_per_s']} sessions/s, {s['throughput_audio_s_per_s']} audio-s/s over {s['busy_window_s']} s |",
        f"| engine alone (same processes, same clips{mix}) | {s['engine_audio_s_per_s'] or '-'} audio-s/s"
        + (
            f" (mean of {s['engine_before_after'][0]} before and {s['engine_before_after'][1]} after the load)"
            if s.get("engine_before_after")
            else ""
        )
        + " |",
        *(
            [
                f"| engine alone on the bench's even mix of the clips | {s['engine_even_mix_audio_s_per_s']} audio-s/s (not the baseline: the load's mix differs) |"
            ]
            if s.get("engine_weighted_by_load_mix")
            else []
        ),
        f"| **throughput / engine** | **{s['engine_ratio'] if s['engine_ratio'] is not None else '-'}** |",
        f"| gateway CPU % (mean / max) | {s['gateway_cpu_percent']['mean']} / {s['gateway_cpu_percent']['max']} |",
        f"| gateway RSS (start / peak) | {_mb(rss['start'], mb)} / {_mb(rss['peak'], mb)} MiB |",
        f"| gateway RSS per connection | {s['gateway_rss_bytes_per_connection'] or '-'} bytes |",
        f"| workers CPU % (sum; mean / max) | {s['workers_cpu_percent']['mean']} / {s['workers_cpu_percent']['max']} |",
        f"| load generator CPU % (mean / max) | {s['load_generator_cpu_percent']['mean']} / {s['load_generator_cpu_percent']['max']} |",
        f"| host CPU % busy, all processes ({s['machine']['cores']} cores = {100 * (s['machine']['cores'] or 0)}; mean / max) | {s['host_cpu_busy_percent']['mean']} / {s['host_cpu_busy_percent']['max']} |",
        f"| host CPU % stolen by the hypervisor (mean / max) | {s['host_cpu_steal_percent']['mean']} / {s['host_cpu_steal_percent']['max']} |",
        f"| gateway log lines/s (mean / max) | {s['gateway_log_lines_per_s']['mean']} / {s['gateway_log_lines_per_s']['max']} |",
        f"| gateway log lines suppressed by sampling | {s['gateway_log_lines_suppressed']:.0f} |",
        f"| `queued` updates per completed session (mean / max) | {s['queued_updates_per_session']['mean']} / {s['queued_updates_per_session']['max']} |",
        f"| wall time (incl. drain) | {s['wall_s']} s |",
        *_resume_rows(s.get("resume")),
        "",
        "Latency of completed sessions (seconds):",
        "",
        "| phase | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|",
        row("connect", lat["connect"]),
        row("time in queue", lat["time_in_queue"]),
        row("first final", lat["first_final"]),
        row("total", lat["total"]),
        "",
    ]
    return "\n".join(lines)


def _resume_rows(r: dict[str, Any] | None) -> list[str]:
    if not r or not (r["drop_rate"] or r["resumes"]):
        return []
    lat, outage = r["reconnect_to_result_s"], r["loss_to_next_final_s"]
    return [
        f"| sessions reset mid-stream (--drop-rate {r['drop_rate']}) / resumes | "
        f"{r['sessions_dropped']} / {r['resumes']} |",
        f"| **finals lost / duplicated / out of order** | **{r['finals_lost']} / "
        f"{r['finals_duplicated']} / {r['finals_out_of_order']}** |",
        f"| reconnect -> first resumed result p50 / p99 | {lat['p50']} / {lat['p99']} s |",
        f"| loss -> next final p50 / p99 (backoff and the unfinished utterance included) | "
        f"{outage['p50']} / {outage['p99']} s |",
    ]


def _mb(v: float | None, mb: int) -> str:
    return f"{v / mb:.1f}" if v else "-"


def plot(s: dict[str, Any], path: Path) -> bool:
    """Write a PNG of throughput, queue depth, connections and latency; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tl = s["timeline"]
    t = [p["t"] for p in tl]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    done = [p["audio_done_s"] for p in tl]
    axes[0].plot(
        t[1:],
        [
            max(0.0, (b - a) / max(1e-9, tb - ta))
            for a, b, ta, tb in zip(done, done[1:], t, t[1:], strict=False)
        ],
    )
    axes[0].set_ylabel("audio-s/s")
    axes[1].plot(t, [p.get("queue_depth", 0) for p in tl])
    axes[1].set_ylabel("queue depth")
    axes[2].plot(t, [p.get("gateway_active", p["active_client"]) for p in tl])
    axes[2].set_ylabel("connections")
    points = s["latency_timeline"]
    axes[3].scatter([p[0] for p in points], [p[1] for p in points], s=4)
    axes[3].set_ylabel("session latency s")
    axes[3].set_xlabel("seconds since start")
    fig.suptitle(f"{s['mode']}: {s['concurrency']} clients, {s['duration_s']:.0f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(s: dict[str, Any], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "report.json", directory / "report.md"]
    written[0].write_text(json.dumps(s, indent=2), encoding="utf-8")
    written[1].write_text(markdown(s), encoding="utf-8")
    if plot(s, directory / "report.png"):
        written.append(directory / "report.png")
    return written
