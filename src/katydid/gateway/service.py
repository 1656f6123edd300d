"""A gateway with its doors and operator endpoints, as ``katydid gateway`` and ``katydid serve``
run it, and its one shutdown order.

Shutdown, however it comes: stop accepting and admitting → sessions finish, bounded by
``shutdown_grace_s`` (``drain``; ``cut_grace`` ends it early) → the rest are told ``shutdown``
and their unanswered jobs are deleted and cancelled → the bus closes. The bus side runs shielded
until its cleanup is done: cancelled together with the sessions, it closed first and the cleanup
went nowhere (jobs transcribed for nobody after a SIGTERM).
"""

from __future__ import annotations

import signal
from functools import partial

import structlog
import trio

from katydid.bus import JobBus
from katydid.config import Config
from katydid.gateway.http import build_app
from katydid.gateway.hub import Hub
from katydid.gateway.websocket import WebSocketDoor
from katydid.gateway.wyoming import WyomingDoor
from katydid.heap import fix_mmap_threshold
from katydid.httpd import serve_http
from katydid.tls import server_context, tls_files

log = structlog.get_logger("katydid.gateway")


class GatewayService:
    def __init__(self, cfg: Config, *, bus: JobBus | None = None) -> None:
        self.cfg = cfg
        # Uploads and job bodies are large, short-lived buffers: returned when freed, not kept
        # in the heap between the sessions still open (heap.py).
        why_not = fix_mmap_threshold(cfg.malloc_mmap_threshold_bytes)
        if why_not is not None:
            log.warning("malloc_not_tuned", reason=why_not)
        self.tls = server_context(cfg)  # a certificate that cannot be used stops us here
        self.gateway = Hub(cfg, bus=bus)
        self.websocket = WebSocketDoor(self.gateway, self.tls)
        self.port: int | None = None
        self.http_port: int | None = None
        self.wyoming_port: int | None = None
        self._infrastructure_stop = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect the bus, open the doors, serve until cancelled; ``started`` gets the
        WebSocket port."""
        async with trio.open_nursery() as outer:
            await outer.start(self._infrastructure)
            try:
                async with trio.open_nursery() as doors:
                    self._say_who_gets_in()
                    if self.gateway.tenants.required:
                        doors.start_soon(self._reload_keys_on_sighup)
                    # The HTTP door serves sessions too (and the operator routes): it stops
                    # with the other doors, before the cleanup of their jobs.
                    if self.cfg.http_port >= 0:
                        tls = tls_files(self.cfg) if self.tls else None
                        self.http_port = await doors.start(
                            partial(serve_http, tls=tls),
                            build_app(self.gateway),
                            self.cfg.http_host,
                            self.cfg.http_port,
                        )
                    if self.cfg.wyoming_port >= 0:
                        wyoming = WyomingDoor(self.gateway, self.tls)
                        self.wyoming_port = await doors.start(wyoming.run)
                    self.port = await doors.start(self.websocket.run)
                    self.gateway.websocket_port = self.port
                    task_status.started(self.port)
            finally:
                with trio.CancelScope(shield=True):
                    await self.gateway.cleanup_done()
                    self._infrastructure_stop.set()

    def addresses(self) -> list[str]:
        """Where its doors listen, as the lines ``serve`` and ``gateway`` print at start."""
        cfg, tls = self.cfg, self.tls is not None
        lines = [f"gateway:  {'wss' if tls else 'ws'}://{cfg.host}:{self.port}"]
        if self.http_port is not None:
            lines.append(
                f"http:     {'https' if tls else 'http'}://{cfg.http_host}:{self.http_port}"
                " (OpenAI-compatible /v1/audio/transcriptions; /metrics, /healthz, /readyz)"
            )
        if self.wyoming_port is not None:
            lines.append(f"wyoming:  {'tls' if tls else 'tcp'}://{cfg.host}:{self.wyoming_port}")
        return lines

    def _say_who_gets_in(self) -> None:
        keys = self.gateway.tenants.keys
        if keys is None:
            log.warning(
                "access_open",
                detail="no api_keys_file: anyone who can reach the ports can transcribe",
            )
        else:
            log.info(
                "access_keys",
                keys_file=str(keys.path),
                keys=len(keys.active_names),
                revoked=len(keys.names) - len(keys.active_names),
            )
            if not keys.active_names:
                log.warning("access_no_keys", detail="the keys file holds no active key")
        if self.cfg.wyoming_port >= 0:
            log.info("wyoming_allow", networks=self.cfg.wyoming_allow)

    async def _reload_keys_on_sighup(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as hangups:
            async for _ in hangups:
                self.gateway.tenants.reload()

    async def _infrastructure(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                await nursery.start(self.gateway.run_bus)
                task_status.started()
                await self._infrastructure_stop.wait()
                nursery.cancel_scope.cancel()

    async def drain(self) -> None:
        """Stop accepting; sessions finish within ``shutdown_grace_s``; the rest are ended."""
        self.gateway.stop()
        self.websocket.stop_accepting()
        with trio.move_on_after(self.cfg.shutdown_grace_s):
            await self.gateway.sessions_ended()
        self.websocket.end_sessions()

    def cut_grace(self) -> None:
        """End the shutdown grace now (a second signal)."""
        self.gateway.stop()
        self.websocket.end_sessions()
