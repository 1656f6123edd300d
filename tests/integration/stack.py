"""Real processes for integration tests: a nats-server on a free port with a temp store, the
gateway and whisper.cpp workers as `katydid` subprocesses, each logging JSON to its own file."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from katydid.bus.accounts import password_environment
from katydid.embedded_nats import nats_server_binary, nats_server_config
from katydid.messages import STREAM
from katydid.ports import free_ports

STARTUP_TIMEOUT_S = 60.0
INFRA = Path(__file__).resolve().parents[2] / "infra"


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    """Something listens on ``port``. A connection to itself does not count: with nothing
    listening, a connect whose ephemeral source port happens to be ``port`` succeeds (TCP
    simultaneous open)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) != 0:
            return False
        return bool(s.getsockname() != s.getpeername())


class Stack:
    """nats-server + gateway + N workers, all real processes."""

    def __init__(
        self,
        root: Path,
        model_dir: Path,
        workers: int | Sequence[str] = 2,
        *,
        nats_accounts: bool = False,
        nats_cluster: int = 0,
        **settings: Any,
    ) -> None:
        """``workers``: how many of the default model, or one model name per worker.
        ``nats_accounts``: nats-server with infra/systemd/katydid-accounts.conf (a user per
        role, ``passwords``), the gateway and workers each with its role's credentials.
        ``nats_cluster``: that many clustered nats-server nodes instead of one."""
        self.root = root
        self.nats_cluster = nats_cluster
        self.nats_nodes: list[dict[str, Any]] = []
        self.passwords: dict[str, str] = {}
        self.role_env: dict[str, dict[str, str]] = {}
        if nats_accounts:
            # Forms nats-server would read as numbers unquoted (see password_environment).
            self.passwords = {"admin": "-68lx-pw", "gateway": "10kb", "worker": "1e5"}
            self.role_env = {
                role: {"KATYDID_NATS_USER": role, "KATYDID_NATS_PASSWORD": self.passwords[role]}
                for role in ("gateway", "worker")
            }
        self.models: dict[int, str | None] = (
            dict.fromkeys(range(workers)) if isinstance(workers, int) else dict(enumerate(workers))
        )
        self.env = os.environ | {
            "KATYDID_MODEL_DIR": str(model_dir),
            "KATYDID_LOG_FORMAT": "json",
            "KATYDID_WORKER_HEARTBEAT_S": "0.25",
            "KATYDID_QUEUE_POLL_S": "0.25",
            "KATYDID_CONSUMER_ACK_WAIT_S": "3",
        }
        self.env |= {f"KATYDID_{k.upper()}": str(v) for k, v in settings.items()}
        # Ports a test named (a door's), not bound until the gateway starts: not to be picked.
        self._named_ports = [int(v) for k, v in settings.items() if k.endswith("_port")]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        try:
            self._start(len(self.models))
        except BaseException:
            self.close()  # a part that failed to start must not leave the others running
            raise

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close()
        if kind is not None and not issubclass(kind, KeyboardInterrupt):
            # pytest shows a failed test's stderr: what the processes said, to tell why.
            for path in sorted(self.root.glob("*.log")):
                text = path.read_text(encoding="utf-8", errors="replace")
                print(f"--- {path.name} (last 4,000 characters) ---", file=sys.stderr)
                print(text[-4000:], file=sys.stderr)

    def _start_cluster(self, nodes: int) -> None:
        """``nodes`` nats-server nodes on loopback routed to each other, each with its own
        store; returns once JetStream's meta group has a leader."""
        picked = free_ports(3 * nodes, avoid=self._named_ports)
        ports, routes, monitors = (picked[i * nodes : (i + 1) * nodes] for i in range(3))
        route_list = ", ".join(f"nats-route://127.0.0.1:{r}" for r in routes)
        for i in range(nodes):
            conf = self.root / f"nats{i}.conf"
            conf.write_text(
                f"server_name: n{i}\n"
                + nats_server_config(self.root / f"js{i}", ports[i], monitors[i])
                + f"cluster {{\n  name: katydid\n  listen: 127.0.0.1:{routes[i]}\n"
                f"  routes: [{route_list}]\n}}\n",
                encoding="utf-8",
            )
            argv = [nats_server_binary(), "-c", str(conf)]
            self.nats_nodes.append(
                {"name": f"n{i}", "argv": argv, "port": ports[i], "monitor": monitors[i]}
            )
            self.start_node(i)

        def meta_leader() -> bool:
            status, body = http_get(f"http://127.0.0.1:{monitors[0]}/jsz")
            return status == 200 and bool(json.loads(body).get("meta_cluster", {}).get("leader"))

        wait_until(meta_leader, 60, "the JetStream cluster to elect a meta leader")
        self.nats = self.nats_nodes[0]["proc"]
        self.nats_port = ports[0]
        self.nats_url = ",".join(f"nats://127.0.0.1:{p}" for p in ports)

    def start_node(self, i: int) -> None:
        node = self.nats_nodes[i]
        node["proc"] = self._spawn(node["argv"], f"nats{i}")
        wait_until(lambda: port_open(node["port"]), 10, f"nats-server node {i}")

    def kill_node(self, i: int) -> None:
        proc = self.nats_nodes[i]["proc"]
        proc.kill()
        proc.wait()

    def _start(self, workers: int) -> None:
        root = self.root
        if self.nats_cluster:
            self._start_cluster(self.nats_cluster)
            self._start_gateway_and_workers(workers)
            return
        nats_port, monitor = free_ports(2, avoid=self._named_ports)
        conf = root / "nats.conf"
        text = nats_server_config(root / "js", nats_port, monitor)
        nats_env = {}
        if self.passwords:
            # The operator's file itself, included as the installed nats-server.conf does.
            shutil.copy(INFRA / "systemd" / "katydid-accounts.conf", root)
            text += 'include "katydid-accounts.conf"\n'
            nats_env = password_environment(self.passwords)
        conf.write_text(text, encoding="utf-8")
        self._nats_argv = [nats_server_binary(), "-c", str(conf)]
        self._nats_env = nats_env
        self.nats = self._spawn(self._nats_argv, "nats", nats_env)
        self.nats_port = nats_port
        wait_until(lambda: port_open(nats_port), 10, "nats-server")
        self.nats_url = f"nats://127.0.0.1:{nats_port}"
        self._start_gateway_and_workers(workers)

    def _start_gateway_and_workers(self, workers: int) -> None:
        self.env["KATYDID_NATS_URL"] = self.nats_url
        # Picked together: two one-at-a-time picks can coincide, and the gateway then fails
        # to bind its second port after the first has answered the wait below.
        self.port, self.http_port = free_ports(2, avoid=self._named_ports)
        self.env["KATYDID_HTTP_PORT"] = str(self.http_port)
        self.metrics_url = f"http://127.0.0.1:{self.http_port}"
        self.gateway = self._spawn(
            [sys.executable, "-m", "katydid", "gateway", "--port", str(self.port)],
            "gateway",
            self.role_env.get("gateway"),
        )
        wait_until(self._gateway_listening, STARTUP_TIMEOUT_S, "gateway")
        self.url = f"ws://127.0.0.1:{self.port}"
        for i in range(workers):
            self.start_worker(i)
        for i in range(workers):
            wait_until(
                lambda i=i: "worker_ready" in self.log(f"worker{i}"),
                STARTUP_TIMEOUT_S,
                f"worker {i}",
            )

    def _gateway_listening(self) -> bool:
        """The gateway said it listens on its port and answers there; one that exited while
        starting fails the wait at once, with its log."""
        if self.gateway.poll() is not None:
            raise RuntimeError(
                f"the gateway exited {self.gateway.returncode} while starting: "
                + self.log("gateway")[-3000:]
            )
        said = any(
            e.get("event") == "gateway_listening" and e.get("port") == self.port
            for e in self.log_events("gateway")
        )
        return said and port_open(self.port)

    def _spawn(
        self, argv: list[str], name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env | (env or {})
            )
        self.procs.append(proc)
        return proc

    def restart_nats(self, down_s: float = 0.0) -> None:
        """Stop nats-server (SIGTERM, as an operator's restart) and start it again on the same
        port and store after ``down_s``."""
        self.nats.terminate()
        self.nats.wait(timeout=15)
        time.sleep(down_s)
        self.nats = self._spawn(self._nats_argv, "nats", self._nats_env)
        wait_until(lambda: port_open(self.nats_port), 10, "nats-server again")

    def start_worker(self, i: int) -> subprocess.Popen[bytes]:
        model = self.models.get(i)
        proc = self._spawn(
            [
                sys.executable,
                "-m",
                "katydid",
                *(("--model", model) if model else ()),
                "worker",
                "--worker-id",
                f"test-w{i}",
            ],
            f"worker{i}",
            self.role_env.get("worker"),
        )
        self.workers[i] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def log_events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log(name).splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stop_serve(serve: subprocess.Popen[str], grace_s: float = 60.0) -> None:
    """SIGTERM a ``katydid serve`` (it drains and stops what it started), SIGKILL after
    ``grace_s``; its pipes read to the end and closed."""
    serve.send_signal(signal.SIGTERM)
    try:
        serve.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        serve.kill()
        serve.communicate()


def http_get(url: str) -> tuple[int, str]:
    """GET ``url``; returns (status, body) for any status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read().decode()


def frozen_busy_worker(nats_url: str, timeout_s: float) -> int:
    """A worker in the middle of a job, frozen there (SIGSTOP): its pid.

    Watches heartbeats for a busy worker, stops it, and checks that the job it reported is
    still in the work-queue stream (unacked: a finished job would have left it). A worker that
    finished in between is let go (SIGCONT) and the watch goes on. So the caller's SIGKILL lands
    mid-job for certain, not by timing.
    """
    import nats
    import nats.js.errors

    async def watch() -> int:
        nc = await nats.connect(nats_url.split(","))
        beats: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_beat(msg: Any) -> None:
            beats.put_nowait(json.loads(msg.data))

        await nc.subscribe("katydid.workers.>", cb=on_beat)
        js = nc.jetstream()
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    beat = await beats.get()
                    seq = beat.get("job_stream_seq")
                    if not beat.get("busy") or seq is None:
                        continue
                    pid = int(beat["pid"])
                    os.kill(pid, signal.SIGSTOP)
                    try:
                        await js.get_msg(STREAM, seq)
                    except nats.js.errors.NotFoundError:
                        os.kill(pid, signal.SIGCONT)  # done meanwhile: not mid-job any more
                        continue
                    return pid
        finally:
            await nc.close()

    return asyncio.run(watch())


def stream_messages(nats_url: str) -> int:
    """Messages (jobs) now stored in the work-queue stream."""
    import nats

    async def count() -> int:
        nc = await nats.connect(nats_url.split(","))
        try:
            info = await nc.jetstream().stream_info(STREAM)
            return int(info.state.messages)
        finally:
            await nc.close()

    return asyncio.run(count())


async def sessions_bucket(js: Any) -> Any:
    """The session records' KV bucket (a gateway's, or made as a gateway makes it): where a
    test gives a session its record, as a gateway does before its first job (workers skip a
    job whose session has none)."""
    import nats.js.errors

    from katydid.session_record import SESSIONS_BUCKET

    try:
        return await js.key_value(SESSIONS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(bucket=SESSIONS_BUCKET, history=1, ttl=120, direct=True)


def publish_jobs(
    nats_url: str,
    jobs: Sequence[tuple[str, bytes, dict[str, str] | None]],
    records: Sequence[str] = (),
) -> None:
    """Publish ``(subject, body, headers)`` messages straight into the job stream, as another
    gateway (or something that is not one) would. ``records``: sessions given a record first,
    as a gateway writes before its first job (workers skip a job whose session has none)."""
    import nats

    from katydid.session_record import ATTACHED, SessionRecord

    async def go() -> None:
        nc = await nats.connect(nats_url.split(","))
        try:
            js = nc.jetstream()
            if records:
                kv = await sessions_bucket(js)
                for session_id in records:
                    record = SessionRecord(
                        session_id, ATTACHED, "", "", {}, updated_unix=time.time()
                    )
                    await kv.put(session_id, record.to_json())
            for subject, body, headers in jobs:
                await js.publish(subject, body, headers=headers)
        finally:
            await nc.close()

    asyncio.run(go())


async def wyoming_transcript(port: int, pcm: bytes, model: str | None = None) -> str:
    """What a Wyoming client (the ``wyoming`` package's own) gets for 16 kHz mono ``pcm``:
    ``transcribe`` (English, ``model`` by name if given), the audio in 100 ms chunks, the
    transcript; an ``error`` event fails the test."""
    from wyoming.asr import Transcribe, Transcript
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient

    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(name=model, language="en").event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        for i in range(0, len(pcm), 3200):
            chunk = AudioChunk(rate=16000, width=2, channels=1, audio=pcm[i : i + 3200])
            await client.write_event(chunk.event())
        await client.write_event(AudioStop().event())
        while True:
            event = await asyncio.wait_for(client.read_event(), 120)
            assert event is not None, "the server closed the connection"
            assert event.type != "error", event.data
            if Transcript.is_type(event.type):
                return Transcript.from_event(event).text
