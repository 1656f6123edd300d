"""The fault scenarios, each against real processes (nats-server, gateway, whisper.cpp workers
from ``tests.integration.stack``), with normal clients whose work must survive the fault.

Each returns a ``Tally``; checks that are specific to a scenario go into ``tally.failures``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from katydid.audio import decode_container, float_to_pcm16
from katydid.evaluation import Clip
from katydid.messages import STREAM
from tests.chaos.harness import (
    Tally,
    gateway_metric,
    normal_session,
    rss_kb,
    until,
    watch_rss,
)
from tests.integration.stack import Stack, frozen_busy_worker, stream_messages

Scenario = Callable[[Path, Path, dict[str, Clip]], Awaitable[Tally]]


def _stack(root: Path, model_dir: Path, workers: int = 2, **settings: Any) -> Stack:
    return Stack(root, model_dir, workers=workers, **settings)


async def _finish(tally: Tally, stack: Stack, settle_s: float = 10.0) -> None:
    """Once every session ended: the jobs left in the stream (after ``settle_s`` for
    deletions) and the gateway's RSS."""
    await until(lambda: stream_messages(stack.nats_url) == 0, settle_s)
    tally.orphan_jobs = await trio.to_thread.run_sync(stream_messages, stack.nats_url)
    tally.rss_kb["after"] = rss_kb(stack.gateway.pid)


async def _run(tally: Tally, stack: Stack, body: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    started = time.monotonic()
    async with trio.open_nursery() as outer:
        outer.start_soon(watch_rss, tally, stack.gateway.pid)
        async with trio.open_nursery() as nursery:
            await body(nursery)
        outer.cancel_scope.cancel()
    tally.seconds = time.monotonic() - started


async def worker_sigkill(root: Path, model_dir: Path, clips: dict[str, Clip]) -> Tally:
    tally = Tally("worker_sigkill", "30 file clients; a worker SIGKILLed mid-job, restarted")
    jfk = clips["jfk.wav"].path.read_bytes()
    with await trio.to_thread.run_sync(lambda: _stack(root, model_dir)) as stack:

        async def body(nursery: trio.Nursery) -> None:
            for _ in range(30):
                nursery.start_soon(lambda: normal_session(tally, stack.url, jfk))
            pid = await trio.to_thread.run_sync(frozen_busy_worker, stack.nats_url, 60.0)
            index = next(i for i, p in stack.workers.items() if p.pid == pid)
            os.kill(pid, signal.SIGKILL)
            stack.workers[index].wait()
            stack.start_worker(index)
            tally.notes.append(f"worker {index} (pid {pid}) SIGKILLed mid-job and restarted")

        await _run(tally, stack, body)
        await _finish(tally, stack)
    tally.check(tally.done == 30, f"{tally.done} of 30 sessions done")
    return tally


async def nats_restart(root: Path, model_dir: Path, clips: dict[str, Clip]) -> Tally:
    tally = Tally("nats_restart", "20 file clients; nats-server restarted under them (2 s down)")
    jfk = clips["jfk.wav"].path.read_bytes()
    with await trio.to_thread.run_sync(lambda: _stack(root, model_dir)) as stack:

        async def body(nursery: trio.Nursery) -> None:
            for _ in range(20):
                nursery.start_soon(lambda: normal_session(tally, stack.url, jfk, timeout_s=120))
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(lambda: stack.restart_nats(down_s=2.0))
            tally.notes.append("nats-server stopped (SIGTERM) 1 s in, started again 2 s later")
            ready = await until(lambda: gateway_metric(stack, "katydid_nats_connected") == 1, 30)
            tally.check(ready, "the gateway did not reconnect to NATS within 30 s")

        await _run(tally, stack, body)
        # New sessions after the restart are served.
        after = Tally("after")
        await normal_session(after, stack.url, jfk)
        tally.check(after.done == 1, "a session after the restart was not served")
        await _finish(tally, stack)
    # Sessions the outage cut off get a coded error (overloaded, retry), never silence.
    tally.check(tally.sessions == 20, f"{tally.sessions} of 20 sessions ended")
    return tally


async def gateway_sigterm(root: Path, model_dir: Path, clips: dict[str, Clip]) -> Tally:
    tally = Tally(
        "gateway_sigterm",
        "20 clients each streaming 106 s of PCM (as fast as allowed); the gateway SIGTERMed"
        " with their jobs queued, resumption off (resume_gateway_sigterm: on)",
    )
    long_clip = next(c for c in clips.values() if c.path.parent.name == "long")
    pcm = float_to_pcm16(decode_container(long_clip.path, max_audio_s=600, max_bytes=10**9))
    with await trio.to_thread.run_sync(
        # Resumption off: each session ends told `overloaded` and its jobs are deleted. (With it
        # on, sessions are detached for their clients to resume elsewhere and their jobs kept
        # for the window: resume_gateway_sigterm.)
        lambda: _stack(root, model_dir, shutdown_grace_s=3, resume_window_s=0)
    ) as stack:

        async def body(nursery: trio.Nursery) -> None:
            for _ in range(20):
                nursery.start_soon(
                    lambda: normal_session(tally, stack.url, pcm, fmt="pcm_s16le", timeout_s=120)
                )
            # SIGTERM once the sessions have jobs waiting (the shutdown must delete them).
            queued = await until(lambda: stream_messages(stack.nats_url) >= 30, 60)
            tally.check(queued, "fewer than 30 jobs were ever queued")
            waiting = await trio.to_thread.run_sync(stream_messages, stack.nats_url)
            stack.gateway.send_signal(signal.SIGTERM)
            tally.notes.append(f"SIGTERM with {waiting} jobs in the stream")
            await trio.to_thread.run_sync(stack.gateway.wait)
            tally.notes.append(f"gateway exited {stack.gateway.returncode} after SIGTERM")

        await _run(tally, stack, body)
        # The gateway is gone: whatever is left in the stream is its sessions' (nobody's) jobs.
        tally.orphan_jobs = await trio.to_thread.run_sync(stream_messages, stack.nats_url)
        tally.rss_kb["after"] = 0
    tally.check(
        tally.errors.get("overloaded", 0) == 20,
        f"{tally.errors.get('overloaded', 0)} of 20 told 'overloaded' (shutting down)",
    )
    return tally


async def hostile_prompt(root: Path, model_dir: Path, clips: dict[str, Clip]) -> Tally:
    tally = Tally(
        "hostile_prompt",
        "starts with a 2 MB and a 0.8 MB prompt ('é' x 1,040,000 and x 400,000) among 10"
        " normal clients, then 5 more",
    )
    jfk = clips["jfk.wav"].path.read_bytes()
    with await trio.to_thread.run_sync(lambda: _stack(root, model_dir)) as stack:

        async def hostile(chars: int) -> None:
            fate: Counter[str] = tally.hostile.setdefault("huge_prompt", Counter())
            start = {"type": "start", "format": "wav", "prompt": "é" * chars}
            async with open_websocket_url(stack.url, max_message_size=2**22) as ws:
                await ws.send_message(json.dumps(start, ensure_ascii=False))
                try:  # its first answer: an event, or the close
                    event = json.loads(await ws.get_message())
                except ConnectionClosed as exc:
                    fate[f"close:{exc.reason.code if exc.reason else None}"] += 1
                else:
                    fate[f"{event['type']}:{event.get('code', '')}"] += 1

        async def body(nursery: trio.Nursery) -> None:
            # 2.08 MB on the wire (over max_frame_bytes) and 0.8 MB (under it, over
            # max_prompt_bytes).
            nursery.start_soon(hostile, 1_040_000)
            nursery.start_soon(hostile, 400_000)
            for _ in range(10):
                nursery.start_soon(lambda: normal_session(tally, stack.url, jfk))

        await _run(tally, stack, body)
        for _ in range(5):
            await normal_session(tally, stack.url, jfk)
        await _finish(tally, stack)
    tally.check(tally.done == 15, f"{tally.done} of 15 normal sessions done")
    # Each is refused as too large: by the session (too_large, then 1009) or, past twice
    # max_frame_bytes, by the WebSocket layer (1009 alone).
    fates = tally.hostile["huge_prompt"]
    refused = fates.get("error:too_large", 0) + fates.get("close:1009", 0)
    tally.check(refused == 2 == sum(fates.values()), f"hostile prompts: {dict(fates)}")
    return tally


async def hostile_clients(root: Path, model_dir: Path, clips: dict[str, Clip]) -> Tally:
    tally = Tally(
        "hostile_clients",
        "20 normal clients among 20 slowloris, 20 idle, 10 never-reading, 10 TCP-reset"
        " and 40 fuzzing clients",
    )
    jfk = clips["jfk.wav"].path.read_bytes()
    pcm = float_to_pcm16(decode_container(clips["jfk.wav"].path, max_audio_s=60, max_bytes=10**8))
    settings = {"handshake_timeout_s": 5, "start_timeout_s": 5, "send_timeout_s": 5}
    with await trio.to_thread.run_sync(lambda: _stack(root, model_dir, **settings)) as stack:
        host, port = "127.0.0.1", stack.port

        def fate(kind: str) -> Counter[str]:
            return tally.hostile.setdefault(kind, Counter())

        async def slowloris() -> None:
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            started = trio.current_time()
            with trio.move_on_after(30) as waited:
                try:
                    while True:
                        await stream.send_all(b"X")  # one byte of a header, now and then
                        with trio.move_on_after(1):
                            if not await stream.receive_some(1024):
                                break
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            outcome = "hang" if waited.cancelled_caught else "closed"
            fate("slowloris")[outcome] += 1
            if outcome == "closed":
                fate("slowloris_closed_after_s")[str(round(trio.current_time() - started))] += 1
            await stream.aclose()

        async def idle() -> None:
            # Connects, never sends start: told 'timeout', closed (4008) at start_timeout_s.
            async with open_websocket_url(stack.url) as ws:
                with trio.move_on_after(30):
                    try:
                        while True:
                            event = json.loads(await ws.get_message())
                            fate("idle")[f"{event['type']}:{event.get('code', '')}"] += 1
                    except ConnectionClosed as exc:
                        fate("idle")[f"close:{exc.reason.code if exc.reason else None}"] += 1
                        return
            fate("idle")["hang"] += 1

        async def never_reading() -> None:
            # A raw WebSocket: handshake, start, audio, stop, then never read again.
            stream = await _raw_websocket(host, port)
            await stream.send_all(_frame(1, json.dumps({"type": "start"}).encode()))
            for i in range(0, len(pcm), 32000):
                await stream.send_all(_frame(2, pcm[i : i + 32000]))
            await stream.send_all(_frame(1, b'{"type": "stop"}'))
            await trio.sleep(20)  # the gateway must end it without our reading
            fate("never_reading")["abandoned after 20 s"] += 1
            await stream.aclose()

        async def reset() -> None:
            stream = await _raw_websocket(host, port)
            await stream.send_all(_frame(1, json.dumps({"type": "start"}).encode()))
            await stream.send_all(_frame(2, pcm[: 5 * 32000]))
            await trio.sleep(1)
            sock = stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()  # RST
            fate("tcp_reset")["reset"] += 1

        async def fuzz(n: int) -> None:
            rng = random.Random(n)
            case = n % 4
            if case == 0:  # bytes that are not HTTP
                stream = await trio.open_tcp_stream(host, port)
                await stream.send_all(rng.randbytes(4096))
                with trio.move_on_after(10) as waited:
                    while await stream.receive_some(4096):
                        pass
                fate("fuzz_bytes")["hang" if waited.cancelled_caught else "closed"] += 1
                await stream.aclose()
                return
            messages: list[str | bytes] = [
                rng.randbytes(rng.randint(1, 5000)),  # audio before start
                json.dumps({"type": "start", "sample_rate": "fast", "channels": [1]}),
                "{" + "".join(rng.choice('{}[]:,"x0') for _ in range(200)),
            ]
            async with open_websocket_url(stack.url) as ws:
                await ws.send_message(messages[case - 1])
                try:
                    while True:
                        with trio.fail_after(10):
                            event = json.loads(await ws.get_message())
                        if event.get("type") == "error":
                            fate("fuzz_messages")[f"error:{event['code']}"] += 1
                except ConnectionClosed:
                    return
                except trio.TooSlowError:
                    fate("fuzz_messages")["hang"] += 1

        async def body(nursery: trio.Nursery) -> None:
            for _ in range(20):
                nursery.start_soon(slowloris)
                nursery.start_soon(idle)
            for _ in range(10):
                nursery.start_soon(never_reading)
                nursery.start_soon(reset)
            for n in range(40):
                nursery.start_soon(fuzz, n)
            for _ in range(20):
                nursery.start_soon(lambda: normal_session(tally, stack.url, jfk))

        await _run(tally, stack, body)
        gone = await until(lambda: gateway_metric(stack, "katydid_active_connections") == 0, 60)
        tally.check(gone, "the gateway still holds sessions 60 s after every client ended")
        await _finish(tally, stack)
    tally.check(tally.done == 20, f"{tally.done} of 20 normal sessions done")
    for kind in ("slowloris", "idle", "fuzz_bytes", "fuzz_messages"):
        tally.check(not tally.hostile.get(kind, Counter()).get("hang"), f"{kind} hung")
    return tally


_TRICKLE_HEAD = (
    b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: multipart/form-data; boundary=z\r\nContent-Length: 100000\r\n\r\n"
    b'--z\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
)


async def http_trickle(root: Path, model_dir: Path, clips: dict[str, Clip]) -> Tally:
    tally = Tally(
        "http_trickle",
        "200 HTTP uploads trickling a body byte every 5 s (slowloris on the OpenAI door, the"
        " default upload_min_bytes_per_s and upload_rate_grace_s) among 20 normal clients",
    )
    jfk = clips["jfk.wav"].path.read_bytes()
    with await trio.to_thread.run_sync(lambda: _stack(root, model_dir)) as stack:
        cfg_grace_s, cfg_rate = 10.0, 1024  # Config's defaults, which the stack keeps
        closed_after: list[float] = []

        def fate(outcome: str) -> None:
            tally.hostile.setdefault("trickle", Counter())[outcome] += 1

        async def trickle() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", stack.http_port)
            await stream.send_all(_TRICKLE_HEAD)
            started = trio.current_time()
            with trio.move_on_after(60) as waited:
                try:
                    while True:
                        await stream.send_all(b"a")
                        with trio.move_on_after(5):
                            answer = await stream.receive_some(64)
                            fate(answer[:12].decode("latin-1") if answer else "closed")
                            break
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    fate("reset")
            if waited.cancelled_caught:
                fate("hang")
            closed_after.append(trio.current_time() - started)
            await stream.aclose()

        async def healthz() -> None:
            await trio.sleep(3)  # every trickle under way
            began = trio.current_time()
            active = await trio.to_thread.run_sync(
                gateway_metric, stack, "katydid_active_connections"
            )
            ok = active == active  # NaN: no answer
            tally.notes.append(
                f"/metrics answered in {trio.current_time() - began:.3f} s among the trickles"
            )
            tally.check(ok, "/metrics did not answer among the trickles")

        async def body(nursery: trio.Nursery) -> None:
            for _ in range(200):
                nursery.start_soon(trickle)
            nursery.start_soon(healthz)
            for _ in range(20):
                nursery.start_soon(lambda: normal_session(tally, stack.url, jfk))

        await _run(tally, stack, body)
        await _finish(tally, stack)
    bound_s = cfg_grace_s + len(_TRICKLE_HEAD) / cfg_rate + 5  # + one 5 s byte interval
    worst = max(closed_after, default=0.0)
    tally.notes.append(
        f"trickles let go after {min(closed_after, default=0):.1f}-{worst:.1f} s"
        f" (bound {bound_s:.1f} s)"
    )
    tally.check(len(closed_after) == 200, f"{len(closed_after)} of 200 trickles ended")
    tally.check(worst <= bound_s, f"a trickle was held {worst:.1f} s, over {bound_s:.1f} s")
    tally.check(not tally.hostile.get("trickle", Counter()).get("hang"), "a trickle hung")
    tally.check(tally.done == 20, f"{tally.done} of 20 normal sessions done")
    return tally


def _stream_leader(nats_url: str) -> tuple[str | None, list[tuple[str, bool]]]:
    """The job stream's leader node and its replicas (name, current)."""
    import asyncio

    import nats

    async def ask() -> tuple[str | None, list[tuple[str, bool]]]:
        nc = await nats.connect(nats_url.split(","))
        try:
            cluster = (await nc.jetstream(timeout=2).stream_info(STREAM)).cluster
        except (TimeoutError, nats.errors.Error):
            return None, []  # no leader at the moment (an election under way)
        finally:
            await nc.close()
        if cluster is None:
            return None, []
        replicas = [(str(r.name), bool(r.current)) for r in cluster.replicas or []]
        return cluster.leader, replicas

    return asyncio.run(ask())


async def cluster_failover(root: Path, model_dir: Path, clips: dict[str, Clip]) -> Tally:
    tally = Tally(
        "cluster_failover",
        "40 file clients over 20 s on a 3-node JetStream cluster (stream_replicas 3); a"
        " follower SIGKILLed and restarted, then the stream leader",
    )
    jfk = clips["jfk.wav"].path.read_bytes()
    with await trio.to_thread.run_sync(
        lambda: _stack(root, model_dir, nats_cluster=3, stream_replicas=3)
    ) as stack:
        names = {n["name"]: i for i, n in enumerate(stack.nats_nodes)}

        async def clients(nursery: trio.Nursery) -> None:
            for _ in range(40):
                nursery.start_soon(lambda: normal_session(tally, stack.url, jfk, timeout_s=180))
                await trio.sleep(0.5)

        async def faults() -> None:
            await trio.sleep(3)
            leader, replicas = await trio.to_thread.run_sync(_stream_leader, stack.nats_url)
            follower = next(name for name, _ in replicas)
            await trio.to_thread.run_sync(stack.kill_node, names[follower])
            tally.notes.append(f"follower {follower} SIGKILLed (leader {leader})")
            await trio.sleep(3)
            await trio.to_thread.run_sync(stack.start_node, names[follower])

            def current() -> bool:
                leader_now, replicas_now = _stream_leader(stack.nats_url)
                return leader_now is not None and all(ok for _, ok in replicas_now)

            caught_up = await until(current, 30)
            tally.check(caught_up, f"follower {follower} did not catch up within 30 s")
            assert leader is not None
            await trio.to_thread.run_sync(stack.kill_node, names[leader])
            killed = trio.current_time()
            elected = await until(lambda: _stream_leader(stack.nats_url)[0] is not None, 30)
            new_leader, _ = await trio.to_thread.run_sync(_stream_leader, stack.nats_url)
            tally.check(elected, "no new stream leader within 30 s")
            tally.notes.append(
                f"leader {leader} SIGKILLed; new leader {new_leader} after"
                f" {trio.current_time() - killed:.1f} s"
            )
            await trio.sleep(3)
            await trio.to_thread.run_sync(stack.start_node, names[leader])
            tally.notes.append(f"{leader} restarted")

        async def body(nursery: trio.Nursery) -> None:
            nursery.start_soon(faults)
            await clients(nursery)

        await _run(tally, stack, body)
        await _finish(tally, stack)
    tally.check(tally.done == 40, f"{tally.done} of 40 sessions done")
    return tally


async def _raw_websocket(host: str, port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await stream.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 101"), answer[:80]
    return stream


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 §5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = np.frombuffer(mask * (n // 4 + 1), dtype=np.uint8)[:n]
    masked = (np.frombuffer(payload, dtype=np.uint8) ^ key).tobytes()
    return head + mask + masked


SCENARIOS: dict[str, Scenario] = {
    "worker_sigkill": worker_sigkill,
    "nats_restart": nats_restart,
    "gateway_sigterm": gateway_sigterm,
    "hostile_prompt": hostile_prompt,
    "hostile_clients": hostile_clients,
    "http_trickle": http_trickle,
    "cluster_failover": cluster_failover,
}
