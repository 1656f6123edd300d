"""The operator's commands on NATS: ``katydid nats setup`` and ``katydid nats status``, and
``katydid serve``'s purge of its embedded store. Each is blocking and runs its own asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors

from katydid.bus.nats_connection import connect, credentials, servers, translate
from katydid.bus.nats_stream import PROBE_SUBJECT, ensure_stream
from katydid.bus.resumption_status import resumption_status
from katydid.catalog import served_name
from katydid.config import Config
from katydid.errors import NatsError
from katydid.messages import (
    LANES,
    STREAM,
    WORKERS_SUBJECT,
    consumer_name,
    is_model_name,
    model_token,
)


async def _refused_everywhere(urls: list[str], timeout_s: float = 2.0) -> bool:
    """Whether every server refuses a TCP connection (a timeout or a name that does not resolve
    is not a refusal: nats-py is left to try, and to say so)."""
    for url in urls:
        parsed = urlsplit(url if "://" in url else f"nats://{url}")
        try:
            host, port = parsed.hostname or "127.0.0.1", parsed.port or 4222
        except ValueError:  # a port that is not a number: nats-py says what is wrong with it
            return False
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except ConnectionRefusedError:
            continue
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return False
    return bool(urls)


def set_up_stream(cfg: Config) -> str:
    """Create the job stream and the default model's consumers (``katydid nats setup``);
    returns what is in place, in words (blocking; runs its own loop).

    Raises:
        NatsError: NATS is unreachable or refused.
    """
    model = served_name(cfg.model)

    async def go() -> None:
        nc = await connect(cfg, "katydid-setup")
        try:
            await ensure_stream(nc.jetstream(), cfg, [model])
        finally:
            await nc.drain()

    try:
        asyncio.run(go())
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise translate(exc) from exc
    names = ", ".join(consumer_name(model, lane) for lane in LANES)
    return f"stream {STREAM} and consumers {names} (model {model}) are in place"


def queue_status(cfg: Config) -> dict[str, Any]:
    """The job stream's state, each consumer's, the workers heard from within two heartbeat
    intervals, and where this deployment resumes sessions, its records and stored results
    (``katydid nats status``; blocking, runs its own loop).

    Raises:
        NatsError: NATS is unreachable, or there is no job stream.
    """
    listen_s = 2.0 * cfg.worker_heartbeat_s + 0.5

    refused: list[str] = []

    async def quiet(exc: Exception) -> None:
        # The one failure that matters is raised below, in words; a refused probe is noted.
        if "permissions violation" in str(exc).lower():
            refused.append(str(exc))

    async def go() -> dict[str, Any]:
        # One attempt: an operator's command must fail at once, not reconnect forever.
        if await _refused_everywhere(servers(cfg.nats_url)):
            # nats-py waits out its whole connect timeout on a refused port (10 s by default).
            raise NatsError(
                f"cannot reach NATS at {cfg.nats_url}: connection refused (is nats-server"
                " running there, and is the URL nats://HOST:PORT?)"
            )
        try:
            nc = await asyncio.wait_for(
                nats.connect(
                    servers(cfg.nats_url),
                    name="katydid-status",
                    connect_timeout=cfg.nats_connect_timeout_s,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    error_cb=quiet,
                    **credentials(cfg),
                ),
                cfg.nats_connect_timeout_s,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            # nats-py gives up on a refused or unknown address by timing out: "TimeoutError()".
            why = (
                f"no connection within {cfg.nats_connect_timeout_s:g} s (is nats-server running"
                " there, and is the URL nats://HOST:PORT?)"
                if isinstance(exc, TimeoutError)
                else repr(exc)
            )
            raise NatsError(f"cannot reach NATS at {cfg.nats_url}: {why}") from exc
        beats: dict[str, dict[str, Any]] = {}

        async def on_beat(msg: Any) -> None:
            try:
                beat = json.loads(msg.data)
                beats[str(beat["id"])] = beat
            except (ValueError, KeyError, TypeError):
                pass  # not a heartbeat: not ours to report

        try:
            await nc.subscribe(f"{WORKERS_SUBJECT}.>", cb=on_beat)
            js = nc.jetstream()
            info = await js.stream_info(STREAM)
            consumers = []
            for c in await js.consumers_info(STREAM):
                subject = c.config.filter_subject or ""
                parts = subject.split(".")
                consumers.append(
                    {
                        "name": c.name,
                        "model": parts[2] if len(parts) == 4 else "",
                        "lane": parts[3] if len(parts) == 4 else "",
                        "pending": int(c.num_pending or 0),
                        "ack_pending": int(c.num_ack_pending or 0),
                        "redelivered": int(c.num_redelivered or 0),
                    }
                )
            stores = await _probe_stream(js, cfg.nats_request_timeout_s)
            resumption = await resumption_status(js, cfg.nats_request_timeout_s)
            await asyncio.sleep(listen_s)
        finally:
            await nc.close()
        if refused:
            stores = {"stores_jobs": None, "why": "not checked: this user may not publish jobs"}
        # A consumer's subject holds its model as a token (``.`` written ``_``): named as the
        # workers and the config name it where one of them does, else left as the token.
        known = [served_name(cfg.model), *(str(b.get("model", "")) for b in beats.values())]
        names = {model_token(m): m for m in known if is_model_name(m)}
        for row in consumers:
            token = str(row["model"])
            row["model"] = names.get(token, token)
        status: dict[str, Any] = {
            "stream": stores
            | {
                "name": STREAM,
                "messages": int(info.state.messages),
                "bytes": int(info.state.bytes),
                "max_msgs": int(info.config.max_msgs or -1),
                "max_bytes": int(info.config.max_bytes or -1),
                "max_msg_size": int(info.config.max_msg_size or -1),
            },
            "consumers": sorted(consumers, key=lambda c: c["name"]),
            "workers": [
                {
                    "id": worker,
                    "model": str(b.get("model", "")),
                    "busy": bool(b.get("busy")),
                    "jobs_done": int(b.get("jobs_done") or 0),
                    # Skipped: their session's record was gone (older workers do not say).
                    "jobs_orphaned": int(b.get("jobs_orphaned") or 0),
                    "rtf": b.get("rtf"),
                }
                for worker, b in sorted(beats.items())
            ],
            "listened_s": listen_s,
        }
        return status | resumption  # "sessions" and "results"

    try:
        return asyncio.run(go())
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
        raise translate(exc) from exc


async def _probe_stream(js: Any, timeout_s: float) -> dict[str, Any]:
    """Whether the stream stores a job now: a message no consumer takes, deleted at once. A
    store with a write error (a full disk) answers every API call but stores nothing."""
    try:
        ack = await js.publish(PROBE_SUBJECT, b"", timeout=timeout_s)
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        why = (
            f"it stored no test message within {timeout_s:g} s: its store cannot write (a full"
            " disk? see nats-server's log); sessions are refused 'overloaded' meanwhile"
        )
        return {"stores_jobs": False, "why": why}
    except nats.js.errors.APIError as exc:
        return {"stores_jobs": False, "why": f"it refused a test message: {exc.description}"}
    with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
        await js.delete_msg(STREAM, ack.seq)
    return {"stores_jobs": True, "why": ""}


def purge_jobs(cfg: Config) -> int:
    """Drop every job in the stream; returns how many there were (blocking; runs its own loop).

    For ``katydid serve``'s embedded NATS only: whatever its store holds at start was queued by a
    gateway that no longer exists, so transcribing it would only delay new clients.

    Raises:
        NatsError: NATS is unreachable or refused.
    """

    async def go() -> int:
        nc = await connect(cfg, "katydid-serve")
        try:
            js = nc.jetstream()
            try:
                stale = int((await js.stream_info(STREAM)).state.messages)
            except nats.js.errors.NotFoundError:
                return 0
            if stale:
                await js.purge_stream(STREAM)
            return stale
        finally:
            await nc.close()

    try:
        return asyncio.run(go())
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise translate(exc) from exc
