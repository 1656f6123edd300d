"""Chaos scenarios of session resumption (spec/resume.md): a gateway SIGKILLed under live
streams that resume on another gateway, connections reset at random, and the jobs of a dead
gateway's sessions that nobody resumes. Each prints a short report of its own (what it measured,
the figures, PASS/FAIL, the host's CPU) besides the suite's table."""

from __future__ import annotations

import random
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from katydid import client
from katydid.audio import decode_container, float_to_pcm16
from katydid.client_resume import ResumeOptions
from katydid.cpu import cpu_model
from katydid.evaluation import Clip, error_rate, word_errors
from katydid.load.report import percentiles
from katydid.load.runner import ClipData, LoadRunner, LoadSpec
from tests.chaos.harness import Tally, until
from tests.chaos.scenarios import Scenario, _finish, _run, _stack
from tests.integration.stack import Stack, free_port, port_open, stream_messages, wait_until

# Nobody is refused for the queue's length: the faults, not admission, are under test.
_NO_REFUSAL = {"default_max_wait_s": 86_400, "ready_max_eta_s": 86_400}
_LATENCY_SESSIONS = 5  # new sessions timed before the uploads and after the kill


def _pcm(clip: Clip) -> bytes:
    return float_to_pcm16(decode_container(clip.path, max_audio_s=600, max_bytes=10**9))


def _report(tally: Tally, figures: list[str]) -> None:
    tally.notes.extend(figures)
    verdict = "PASS" if tally.passed else "FAIL: " + "; ".join(tally.failures or ["lost/hang"])
    print(f"--- {tally.scenario}: {tally.what}", flush=True)
    for line in figures:
        print(f"    {line}")
    print(f"    {verdict} (host CPU: {cpu_model()})", flush=True)


def _ms(p: dict[str, float | None]) -> str:
    return "/".join("-" if v is None else f"{v * 1000:.0f}" for v in (p["p50"], p["p99"]))


def _by_kind(results: Sequence[Any]) -> str:
    """What the first result after each resume was, and how soon it came by kind: a partial
    (the priority lane) against a final or a chunk error (its turn in the queue)."""
    pairs = [
        p for r in results for p in zip(r.resume_first_kinds, r.resume_latencies_s, strict=True)
    ]
    kinds = sorted({k for k, _ in pairs})
    parts = [
        f"{kind} {len(ts)} (p50/p99 {_ms(percentiles(ts))} ms)"
        for kind in kinds
        for ts in [[t for k, t in pairs if k == kind]]
    ]
    return "first result after a resume: " + (", ".join(parts) or "none")


def _second_gateway(stack: Stack, name: str = "gateway2") -> tuple[Any, str]:
    """Another gateway on the stack's NATS (its own WebSocket port, no HTTP door)."""
    port = free_port()
    env = {"KATYDID_HTTP_PORT": "-1"} | (stack.role_env.get("gateway") or {})
    proc = stack._spawn(
        [sys.executable, "-m", "katydid", "gateway", "--port", str(port)], name, env
    )
    wait_until(lambda: port_open(port), 60, name)
    return proc, f"ws://127.0.0.1:{port}"


def _answered(result: client.SessionResult) -> list[int]:
    """The seqs delivered (finals and chunk errors), in the order they came."""
    return [
        int(e["seq"]) for e in result.events if e.get("type") in ("final", "error") and "seq" in e
    ]


def _in_order_once(result: client.SessionResult | None) -> bool:
    if result is None or result.done is None:
        return False
    return _answered(result) == list(range(int(result.done["chunks"])))


async def resume_gateway_kill(root: Path, model_dir: Path, clips: dict[str, Clip]) -> Tally:
    return await _resume_after_gateway_loss(root, model_dir, clips, signal.SIGKILL)


async def resume_gateway_sigterm(root: Path, model_dir: Path, clips: dict[str, Clip]) -> Tally:
    """A rolling restart: the gateway is told to stop. Past its grace (1 s here, shorter than
    the streams) it tells its sessions `overloaded` and closes them 1001 (going away), their
    jobs kept; they resume on the other gateway. (Within the grace they would finish where they
    are.)"""
    return await _resume_after_gateway_loss(root, model_dir, clips, signal.SIGTERM)


async def _resume_after_gateway_loss(
    root: Path, model_dir: Path, clips: dict[str, Clip], sig: signal.Signals
) -> Tally:
    what = "SIGKILLed" if sig == signal.SIGKILL else "SIGTERMed"
    tally = Tally(
        "resume_gateway_kill" if sig == signal.SIGKILL else "resume_gateway_sigterm",
        "50 live streams of real speech (11-19 s, paced 1x, 0.1-0.5 s frames, partials) on two"
        f" gateways of one NATS, half on each; one gateway {what} 6 s in, its clients resume"
        " on the other (client fallback_urls); WER against an undisturbed pass of the same",
    )
    names = ["jfk.wav", "ls_1088-134315-0000.wav", "deepgram_preamble.wav"]
    audio = {n: _pcm(clips[n]) for n in names}
    rng = random.Random(34)
    plan = [(names[i % 3], 3200 * rng.randint(1, 5), rng.uniform(0, 1)) for i in range(50)]
    grace: dict[str, Any] = {"shutdown_grace_s": 1.0} if sig == signal.SIGTERM else {}
    with await trio.to_thread.run_sync(
        lambda: _stack(root, model_dir, **_NO_REFUSAL, **grace)
    ) as stack:
        _, other = await trio.to_thread.run_sync(_second_gateway, stack)
        urls = (stack.url, other)

        async def one(i: int, into: dict[int, client.SessionResult | None]) -> None:
            name, frame, delay = plan[i]
            await trio.sleep(delay)
            url = urls[i % 2]
            lost_at: list[float] = []

            def status(what: str) -> None:
                # loss -> `resumed` (the session back), beside the client's loss -> next result
                if what == "reconnecting":
                    lost_at.append(trio.current_time())
                elif lost_at and into is hit:
                    back_s.append(trio.current_time() - lost_at.pop())

            try:
                into[i] = await client.transcribe(
                    url,
                    audio[name],
                    frame_bytes=frame,
                    realtime=True,
                    options={"partials": True},
                    session_timeout_s=150,
                    fallback_urls=[u for u in urls if u != url],
                    on_status=status,
                )
            except client.ClientError as exc:
                into[i] = None
                tally.errors[f"client:{exc.kind}"] += 1

        calm: dict[int, client.SessionResult | None] = {}
        hit: dict[int, client.SessionResult | None] = {}
        back_s: list[float] = []
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i, calm)

        async def body(nursery: trio.Nursery) -> None:
            for i in range(50):
                nursery.start_soon(one, i, hit)
            await trio.sleep(6)  # every stream started (<= 1 s) and none ended (>= 11 s)
            stack.gateway.send_signal(sig)
            await trio.to_thread.run_sync(stack.gateway.wait)

        await _run(tally, stack, body)
        await _finish(tally, stack)

    def pooled(results: dict[int, client.SessionResult | None]) -> float:
        errors = words = 0
        for i, res in results.items():
            heard = res.text if res is not None else ""
            e, w = word_errors(clips[plan[i][0]].reference, heard)
            errors, words = errors + e, words + w
        return 100 * error_rate(errors, words)

    killed = [hit.get(i) for i in range(0, 50, 2)]  # the even ones were on the lost gateway
    tally.sessions = sum(r is not None for r in hit.values())
    tally.done = sum(r is not None and r.done is not None for r in hit.values())
    tally.finals = sum(len(r.finals) for r in hit.values() if r is not None)
    bad = [i for i in range(50) if not _in_order_once(hit.get(i))]
    dup = sum(r.duplicates for r in hit.values() if r is not None)
    ooo = sum(r.out_of_order for r in hit.values() if r is not None)
    resumed = sum(r is not None and r.resumes >= 1 for r in killed)
    latencies = [t for r in killed if r is not None for t in r.resume_latencies_s]
    latency, n_latency = percentiles(latencies), len(latencies)
    outage = percentiles([t for r in killed if r is not None for t in r.outage_to_final_s])
    calm_ok = sum(_in_order_once(calm.get(i)) for i in range(50))
    wer_calm, wer_hit = pooled(calm), pooled(hit)
    tally.lost = len(bad)
    tally.check(calm_ok == 50, f"undisturbed pass: {calm_ok} of 50 complete")
    tally.check(resumed == 25, f"{resumed} of 25 sessions of the {what} gateway resumed")
    tally.check(dup == 0 and ooo == 0, f"{dup} finals duplicated, {ooo} out of order")
    tally.check(abs(wer_hit - wer_calm) <= 0.5, f"WER {wer_hit:.2f}% vs {wer_calm:.2f}%")
    _report(
        tally,
        [
            f"undisturbed pass: {calm_ok}/50 sessions complete, pooled WER {wer_calm:.2f}%",
            f"with the gateway {what}: {50 - len(bad)}/50 sessions got every final once in order"
            f" (bad: {bad[:10]}); {tally.finals} finals; duplicates received {dup},"
            f" out of order {ooo}; pooled WER {wer_hit:.2f}%"
            f" (delta {wer_hit - wer_calm:+.2f} points, limit 0.5)",
            f"sessions of the {what} gateway resumed: {resumed}/25; reconnect -> first resumed"
            f" result (a partial or final; backoff excluded) p50/p99 {_ms(latency)} ms"
            f" (n={n_latency}); loss -> `resumed` p50/p99 {_ms(percentiles(back_s))} ms"
            f" (n={len(back_s)}); for scale, loss -> next final p50/p99 {_ms(outage)} ms (the"
            " speaker's unfinished utterance, then its turn in the queue)",
            _by_kind([r for r in killed if r is not None]),
        ],
    )
    return tally


async def resume_resets(root: Path, model_dir: Path, clips: dict[str, Clip]) -> Tally:
    tally = Tally(
        "resume_resets",
        "100 live streams (5-11 s, paced 1x, partials) via the load runner with --drop-rate 1.0: each"
        " connection reset once at a random moment mid-stream, resumed on the same gateway",
    )
    names = [
        "jfk.wav",
        "ls_1995-1837-0001.wav",
        "librivox_ss01_0870.wav",
        "ljspeech_LJ050-0131.wav",
        "ls_1272-128104-0000.wav",
    ]
    data = [ClipData(n, pcm := _pcm(clips[n]), "pcm_s16le", len(pcm) / 32_000) for n in names]
    with await trio.to_thread.run_sync(lambda: _stack(root, model_dir, **_NO_REFUSAL)) as stack:
        # duration 2 s, ramp 1 s: every virtual client starts one session, none a second.
        spec = LoadSpec(
            url=stack.url,
            clips=data,
            mode="stream",
            concurrency=100,
            duration_s=2.0,
            ramp_s=1.0,
            session_timeout_s=150,
            drain_s=150,
            drop_rate=1.0,
            partials=True,
            seed=34,
        )
        stats: list[Any] = []

        async def body(nursery: trio.Nursery) -> None:
            stats.append(await LoadRunner(spec).run())

        await _run(tally, stack, body)
        await _finish(tally, stack)
    records = stats[0].records
    outcomes = Counter(r.outcome for r in records)
    ok = [r for r in records if r.outcome == "ok"]
    lost = sum(r.finals_lost for r in ok)
    dup = sum(r.finals_duplicated for r in ok)
    ooo = sum(r.finals_out_of_order for r in ok)
    latencies = [t for r in ok for t in r.resume_latencies_s]
    latency, n_latency = percentiles(latencies), len(latencies)
    outage = percentiles([t for r in ok for t in r.outage_to_final_s])
    tally.sessions, tally.done = len(records), len(ok)
    tally.lost = lost + len(records) - len(ok)
    for outcome, n in outcomes.items():
        if outcome != "ok":
            tally.errors[outcome] += n
    dropped = sum(r.dropped for r in records)
    resumes = sum(r.resumes for r in records)
    tally.check(len(records) == 100 and len(ok) == 100, f"outcomes {dict(outcomes)}")
    tally.check(dropped == 100 and resumes >= 100, f"{dropped} reset, {resumes} resumes")
    tally.check(dup == 0 and ooo == 0, f"{dup} finals duplicated, {ooo} out of order")
    _report(
        tally,
        [
            f"sessions {len(records)}, outcomes {dict(outcomes)}; connections reset {dropped},"
            f" resumes {resumes}",
            f"finals lost {lost}, duplicated {dup}, out of order {ooo}",
            f"reconnect -> first resumed result (a partial or final; backoff excluded) p50/p99"
            f" {_ms(latency)} ms (n={n_latency}); for scale, loss -> next final p50/p99"
            f" {_ms(outage)} ms, a session's longest queue wait p50/p99"
            f" {_ms(percentiles([r.queue_s for r in ok]))} ms (the backlog, not the resume)",
            _by_kind(ok),
        ],
    )
    return tally


def _job_lines(stack: Stack, workers: Sequence[int]) -> list[dict[str, Any]]:
    return [e for w in workers for e in stack.log_events(f"worker{w}") if e.get("event") == "job"]


async def orphans_after_gateway_kill(root: Path, model_dir: Path, clips: dict[str, Clip]) -> Tally:
    # Short enough that the dead gateway's queue (~15-25 s of work on 2 cores) outlasts it.
    window_s = 10.0
    tally = Tally(
        "orphans_after_gateway_kill",
        f"150 short file uploads queued on a gateway (resume_window_s {window_s:.0f}), the"
        " gateway SIGKILLed with nobody resuming, a second gateway started: no job of the dead"
        " gateway's sessions decoded after the window, none left queued; a new session's latency",
    )
    names = [
        "ls_1995-1837-0001.wav",
        "librivox_ss01_0870.wav",
        "ljspeech_LJ050-0131.wav",
        "ls_1272-128104-0000.wav",
        "librivox_ss01_0890.wav",
    ]
    files = [clips[n].path.read_bytes() for n in names]
    jfk = clips["jfk.wav"].path.read_bytes()
    dead_sessions: set[str] = set()
    fates: Counter[str] = Counter()
    figures: list[str] = []
    with await trio.to_thread.run_sync(
        lambda: _stack(root, model_dir, resume_window_s=window_s, **_NO_REFUSAL)
    ) as stack:
        # One session of ~0.5 s on a shared host is noise: compare medians of a few, in sequence.
        calm = [
            await client.transcribe(stack.url, jfk, fmt="wav", frame_bytes=65_536)
            for _ in range(_LATENCY_SESSIONS)
        ]
        kill_at = 0.0

        async def upload(i: int) -> None:
            def seen(event: dict[str, Any]) -> None:
                if event.get("type") == "ready":
                    dead_sessions.add(str(event["session_id"]))

            try:
                res = await client.transcribe(
                    stack.url,
                    files[i % len(files)],
                    fmt="wav",
                    frame_bytes=65_536,
                    on_event=seen,
                    resume=ResumeOptions(enabled=False),  # nobody comes back for them
                    session_timeout_s=150,
                )
            except client.ClientError as exc:
                fates[f"client:{exc.kind}"] += 1
                return
            fates["done" if res.done is not None else f"close:{res.close_code}"] += 1

        after: list[client.SessionResult] = []

        async def body(nursery: trio.Nursery) -> None:
            nonlocal kill_at
            for i in range(150):
                nursery.start_soon(upload, i)
            queued = await until(lambda: stream_messages(stack.nats_url) >= 100, 60)
            tally.check(queued, "fewer than 100 jobs were ever queued")
            waiting = await trio.to_thread.run_sync(stream_messages, stack.nats_url)
            stack.gateway.send_signal(signal.SIGKILL)
            kill_at = time.time()
            await trio.to_thread.run_sync(stack.gateway.wait)
            figures.append(f"SIGKILL with {waiting} jobs in the stream")
            _, url = await trio.to_thread.run_sync(_second_gateway, stack)
            figures.append(f"second gateway listening {time.time() - kill_at:.1f} s after the kill")
            for _ in range(_LATENCY_SESSIONS):
                after.append(await client.transcribe(url, jfk, fmt="wav", frame_bytes=65_536))

        await _run(tally, stack, body)
        drained = await until(lambda: stream_messages(stack.nats_url) == 0, 120)
        tally.check(drained, "the job stream did not drain within 120 s")
        tally.orphan_jobs = await trio.to_thread.run_sync(stream_messages, stack.nats_url)
        jobs = _job_lines(stack, list(stack.workers))
    # The job line is logged when a job ends; its engine work (and the record check just
    # before it) began compute_s earlier. A job checked inside the window may end past it.
    outcomes: Counter[str] = Counter()
    late_ok: list[float] = []  # began decoding after the window: the failure
    straddling: list[str] = []  # began within the window, ended after it
    late_sessions: set[str] = set()
    first_orphan = last_ok = None
    for job in jobs:
        if job.get("session_id") not in dead_sessions:
            continue
        ended = datetime.fromisoformat(str(job["timestamp"])).timestamp() - kill_at
        began = ended - float(job.get("compute_s") or 0.0)
        outcome = str(job.get("outcome"))
        outcomes[f"{outcome} {'after' if ended > window_s else 'before'} the window"] += 1
        if outcome == "ok":
            last_ok = ended if last_ok is None else max(last_ok, ended)
            if began > window_s:
                late_ok.append(round(began, 2))
                late_sessions.add(str(job["session_id"]))
            elif ended > window_s:
                straddling.append(f"{began:.2f}-{ended:.2f} s")
        elif outcome == "orphaned":
            first_orphan = ended if first_orphan is None else min(first_orphan, ended)
    # Why a job began after the window: every job line of its session (a sibling checked just
    # before, within the worker's 1 s cache of a check, or a record that outlived the window).
    for job in jobs:
        if job.get("session_id") in late_sessions:
            ended = datetime.fromisoformat(str(job["timestamp"])).timestamp() - kill_at
            figures.append(
                f"late session {str(job['session_id'])[:8]}: job {job.get('seq')} ended"
                f" {ended:.2f} s after the kill, compute {job.get('compute_s')} s, outcome"
                f" {job.get('outcome')}"
            )
    calm_s = statistics.median(r.total_s for r in calm)
    after_s = [r.total_s for r in after]
    ratio = statistics.median(after_s) / calm_s if after_s and calm_s else float("nan")
    tally.sessions, tally.done = len(dead_sessions), fates["done"]
    orphaned = sum(n for k, n in outcomes.items() if k.startswith("orphaned"))
    tally.check(orphaned > 0, "no job was orphaned: the queue drained within the window")
    # The bound the design allows: the window, plus the worker's 1 s memory of a check
    # (liveness.py ttl_s: a session's later job may ride on a check made just inside the
    # window). Any job begun after the window at all is reported with its time below.
    tally.check(
        not [t for t in late_ok if t > window_s + 1.0],
        f"jobs began decoding more than 1 s after the window, at {late_ok[:5]} s",
    )
    tally.check(
        len(after) == _LATENCY_SESSIONS and all(r.done is not None for r in after),
        "a session on the second gateway failed",
    )
    tally.check(
        ratio <= 2,
        f"new sessions on the second gateway took {ratio:.1f}x their undisturbed latency"
        " (median; floor 2x)",
    )
    figures += [
        f"clients of the killed gateway: {dict(fates)}",
        f"their jobs on the workers: {dict(sorted(outcomes.items()))}; last decoded"
        f" {last_ok if last_ok is None else round(last_ok, 1)} s after the kill, first orphaned"
        f" {first_orphan if first_orphan is None else round(first_orphan, 1)} s after it"
        f" (window {window_s:.0f} s); decoded jobs begun after the window: {len(late_ok)} {late_ok[:5]};"
        f" begun within it and ended after it: {straddling or 'none'} (after the kill)",
        f"jobs left in the stream after the drain: {tally.orphan_jobs}",
        f"new sessions (jfk.wav, 11 s; {_LATENCY_SESSIONS} in sequence) right after the kill:"
        f" {', '.join(f'{t:.2f}' for t in after_s)} s; undisturbed, before the uploads:"
        f" {', '.join(f'{r.total_s:.2f}' for r in calm)} s; medians {ratio:.1f}x (floor 2x;"
        " the dead gateway's jobs are decoded only when nothing else is queued, and give way"
        " to a job that comes)",
    ]
    _report(tally, figures)
    return tally


RESUME_SCENARIOS: dict[str, Scenario] = {
    "resume_gateway_kill": resume_gateway_kill,
    "resume_gateway_sigterm": resume_gateway_sigterm,
    "resume_resets": resume_resets,
    "orphans_after_gateway_kill": orphans_after_gateway_kill,
}
