"""``katydid serve``: nats-server, the gateway and N workers, supervised in one trio nursery.

Rule 1: child processes are children of this nursery: a crashed worker is restarted with
exponential backoff (capped), and nothing outlives ``serve``.
Rule 2: shutdown order on SIGINT/SIGTERM: stop accepting → sessions finish within the grace
deadline → workers (SIGTERM: they finish their job; SIGKILL after a deadline) → NATS.
The children themselves: ``embedded_nats`` (nats-server and its store), ``worker_processes``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import structlog
import trio

from katydid import data_dir
from katydid.bus.accounts import embedded_credentials
from katydid.bus.nats_admin import purge_jobs
from katydid.catalog import served_name
from katydid.config import Config
from katydid.embedded_nats import run_nats_server, sized_stream
from katydid.gateway import GatewayService
from katydid.lifecycle import until_signalled
from katydid.ports import free_ports
from katydid.sdnotify import notify
from katydid.worker_processes import supervise_worker, worker_argv, worker_user

log = structlog.get_logger("katydid.serve")


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
            workers = "worker0" if total == 1 else f"worker0..{total - 1}"
            announce(
                f"nats:     {nats_url} (users admin, gateway, {workers}: passwords in"
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
