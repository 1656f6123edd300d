"""``katydid serve``'s worker processes: each one's command line and NATS user, and each kept
running (restarted with capped exponential backoff when it exits)."""

from __future__ import annotations

import socket
import sys

import structlog
import trio

from katydid.child_processes import RESTART_FIRST_S, restart_backoff, terminate
from katydid.config import Config
from katydid.exits import describe_exit

log = structlog.get_logger("katydid.serve")  # its events are serve's


def worker_user(index: int) -> str:
    """serve's NATS user for its worker ``index``: each worker its own, so none hears another's
    jobs (its inbox is its own) and the logs of nats-server name which one did what."""
    return f"worker{index}"


async def supervise_worker(cfg: Config, index: int, argv: list[str], env: dict[str, str]) -> None:
    """Keep one worker process running; restart it with capped exponential backoff."""
    backoff = RESTART_FIRST_S
    while True:
        started = trio.current_time()
        result = await trio.run_process(
            argv,
            check=False,
            stderr=sys.stderr,  # the real one (see native_stderr)
            env=env,
            start_new_session=True,
            deliver_cancel=terminate,
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
