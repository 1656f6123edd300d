"""The ``katydid`` subcommands that run a server or administer one: serve, gateway, worker,
nats setup|status."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from typing import Any

import trio

from katydid.config import Config
from katydid.errors import KatydidError, NatsError
from katydid.sdnotify import notify


def _require_nats(cfg: Config) -> None:
    if not cfg.nats_url:
        raise KatydidError(
            "no NATS URL: pass --nats-url or set KATYDID_NATS_URL (or --data-dir: that of a"
            " `katydid serve` on this host)"
        )


async def _gateway_alone(cfg: Config) -> None:
    from katydid.gateway import GatewayService
    from katydid.lifecycle import until_signalled

    gateway = GatewayService(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        for line in gateway.addresses():
            print(line, flush=True)
        notify("READY=1")
        await until_signalled(gateway.drain, gateway.cut_grace, name="gateway")
        nursery.cancel_scope.cancel()


def _nats_setup(cfg: Config) -> None:
    from katydid.bus.nats_admin import set_up_stream

    print(set_up_stream(cfg))


def embedded_admin(cfg: Config) -> Config:
    """For ``katydid nats status|setup`` on ``katydid serve``'s host: where no NATS URL or no
    credentials are configured, those of serve's embedded NATS, from its data dir (the URL from
    its nats-server.conf, the admin password from its credentials.json). Without them, status
    said "Authorization Violation" to a user who could reach it, and not where they are."""
    nats_dir = cfg.data_dir / "nats"
    changes: dict[str, Any] = {}
    if not cfg.nats_url:
        try:
            conf = (nats_dir / "nats-server.conf").read_text(encoding="utf-8")
        except OSError:
            return cfg
        listen = re.search(r"^listen: (\S+)$", conf, re.M)
        if listen is None:
            return cfg
        changes["nats_url"] = f"nats://{listen.group(1)}"
    if not (cfg.nats_user or cfg.nats_creds_file or cfg.nats_nkey_seed_file):
        try:
            stored = json.loads((nats_dir / "credentials.json").read_text(encoding="utf-8"))
            changes |= {"nats_user": "admin", "nats_password": str(stored["admin"])}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return dataclasses.replace(cfg, **changes)


def run_server_command(cfg: Config, args: argparse.Namespace) -> int:
    if args.command == "serve":
        from katydid.serve import serve

        trio.run(lambda: serve(cfg, announce=lambda line: print(line, flush=True)))
        return 0
    if args.command == "nats":
        configured = cfg.nats_url
        cfg = embedded_admin(cfg)
        if not configured and cfg.nats_url:
            try:
                return _nats_command(cfg, args)
            except NatsError as exc:
                # A URL the user never gave: say where it came from, and how to give another.
                conf = cfg.data_dir / "nats" / "nats-server.conf"
                raise NatsError(
                    f"{exc}; that URL is where `katydid serve` with data dir {cfg.data_dir}"
                    f" last started its NATS ({conf}): is it running? Another server:"
                    " --data-dir DIR, or --nats-url"
                ) from exc
    _require_nats(cfg)
    if args.command == "gateway":
        trio.run(_gateway_alone, cfg)
    elif args.command == "worker":
        from katydid_worker import models
        from katydid_worker.worker import run_worker

        run_worker(cfg, models.resolve(cfg.model_dir, cfg.model), args.worker_id)
    else:
        return _nats_command(cfg, args)
    return 0


def _nats_command(cfg: Config, args: argparse.Namespace) -> int:
    if args.nats_command == "status":
        from katydid.bus.nats_admin import queue_status

        status = queue_status(cfg)
        print(json.dumps(status) if args.json else _status_table(status))
    else:
        _nats_setup(cfg)
    return 0


def _status_table(status: dict[str, Any]) -> str:
    """``katydid nats status`` for a terminal: what `nats stream info` and `nats consumer
    report` show, the workers' heartbeats, and session resumption's bucket and stream."""
    st = status["stream"]
    lines = [
        f"stream {st['name']}: {st['messages']} jobs, {st['bytes']} bytes"
        f" (bounds: {st['max_msgs']} jobs, {st['max_bytes']} bytes, {st['max_msg_size']} per job)",
        *([f"stream stores no job now: {st['why']}"] if st.get("stores_jobs") is False else []),
        "",
        f"{'consumer':<36} {'model':<20} {'lane':<12} {'pending':>8} {'in progress':>12}"
        f" {'redelivered':>12}",
    ]
    for c in status["consumers"]:
        lines.append(
            f"{c['name']:<36} {c['model']:<20} {c['lane']:<12} {c['pending']:>8}"
            f" {c['ack_pending']:>12} {c['redelivered']:>12}"
        )
    lines += [
        "",
        f"{'worker':<36} {'model':<20} {'busy':<6} {'jobs':>8} {'rtf':>8} {'orphaned':>9}",
    ]
    for w in status["workers"]:
        rtf = f"{w['rtf']:.3f}" if isinstance(w.get("rtf"), int | float) else "-"
        lines.append(
            f"{w['id']:<36} {w['model']:<20} {'yes' if w['busy'] else 'no':<6}"
            f" {w['jobs_done']:>8} {rtf:>8} {w.get('jobs_orphaned', 0):>9}"
        )
    if not status["workers"]:
        lines.append(f"(no heartbeat within {status['listened_s']:.1f} s)")
    return "\n".join(lines + _resumption_lines(status))


def _resumption_lines(status: dict[str, Any]) -> list[str]:
    """The sessions bucket and the results stream, where this deployment has them."""
    lines = []
    if (kv := status.get("sessions")) is not None:
        records = "?" if kv["records"] is None else kv["records"]
        lines.append(
            f"bucket {kv['bucket']}: {records} resumable sessions"
            + (
                f" ({kv['entries']} entries with ended sessions' markers)"
                if "entries" in kv
                else ""
            )
            + (f"; {kv['why']}" if kv.get("why") else "")
        )
        if kv.get("allow_direct") is False:
            lines.append("  it does not allow direct gets: workers cannot check sessions")
    if (rs := status.get("results")) is not None:
        if rs["messages"] is None:
            lines.append(f"stream {rs['name']}: {rs['why']}")
        else:
            lines.append(
                f"stream {rs['name']}: {rs['messages']} results, {rs['bytes']} bytes"
                f" (bounds: {rs['max_bytes']} bytes, {rs['max_age_s']:g} s)"
            )
    return ["", *lines] if lines else []
