"""The native WebSocket door (protocol v1): WebSocket messages in and out of a ``Session``.

Each connection is the task that accepted it: it does the handshake (``ws_transport``), then
reads the client's messages (and the clock: it waits for the next message until the session's
deadline); its nursery holds a writer while the bus has news for it (results, dead jobs, queue
state) and, for an upload after ``stop``, a decoder. Transport errors are mapped at the edge
(``ws_transport``) to session inputs (``client_gone``, ``too_large``); nothing past it sees them.

Rule 1: no connection-count limit; every bound is the session's.
Rule 2: a client that does not read blocks only its own sends, and is cut off after
``send_timeout_s``; one that does not write times out by the session's deadlines.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Coroutine
from functools import partial
from typing import Any

import structlog
import trio

from katydid.config import Config
from katydid.errors import listening
from katydid.gateway.credentials import bearer, query_key
from katydid.gateway.driver import SessionDriver
from katydid.gateway.events import ServerEvent
from katydid.gateway.hub import Hub
from katydid.gateway.listening import accept_forever, tls
from katydid.gateway.live import Live
from katydid.gateway.native_wire import receive_text
from katydid.gateway.outputs import Close
from katydid.gateway.parking import Parking, Wake
from katydid.gateway.vosk import VoskConnection
from katydid.gateway.ws_handshake import accept
from katydid.gateway.ws_reading import park_reader, receive
from katydid.gateway.ws_transport import Piece, ServerWebSocket

log = structlog.get_logger("katydid.gateway")


class WebSocketDoor:
    """Listens on ``cfg.host:cfg.port`` and serves each connection as a session."""

    def __init__(self, gateway: Hub, tls: ssl.SSLContext | None = None) -> None:
        self.gateway = gateway
        self.cfg: Config = gateway.cfg
        self.tls = tls
        self.port: int | None = None
        self._accepting: trio.CancelScope | None = None
        self._sessions: trio.CancelScope | None = None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``started`` gets the bound port."""
        async with trio.open_nursery() as handlers:
            self._sessions = handlers.cancel_scope
            # A handler is ``serve_stream`` itself, not a method calling it: a frame fewer for
            # each of thousands of waiting sessions.
            serve = partial(serve_stream, self.gateway, parking=Parking(handlers))
            with trio.CancelScope() as accepting:
                self._accepting = accepting
                listeners = await self._listeners()
                # The TLS handshake runs inside the WebSocket handshake's timeout.
                wrap = tls(self.tls, https_compatible=True) if self.tls is not None else None
                self.port = _port(listeners[0])
                log.info(
                    "gateway_listening",
                    host=self.cfg.host,
                    port=self.port,
                    gateway=self.gateway.gateway_id,
                )
                task_status.started(self.port)
                # The accept loops run inside ``accepting`` (trio.serve_listeners would move
                # them into the handlers' nursery, out of its reach): stop_accepting closes the
                # listeners, so a draining gateway is no longer connected to (with SO_REUSEPORT
                # the kernel sends new clients to the other gateways).
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(
                            partial(
                                accept_forever,
                                listener,
                                handlers,
                                serve,
                                self.gateway.sampled,
                                wrap=wrap,
                            )
                        )

    def stop_accepting(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()

    def end_sessions(self) -> None:
        """Cancel every connection; each tells its client (``shutdown``) on the way out."""
        if self._sessions is not None:
            self._sessions.cancel()

    async def _listeners(self) -> list[trio.SocketListener]:
        """The listening sockets; with ``reuse_port``, bound with SO_REUSEPORT, so that several
        gateway processes on one host share the port (the kernel spreads connections)."""
        with listening("WebSocket door", self.cfg.host, self.cfg.port):
            return await self._bind()

    async def _bind(self) -> list[trio.SocketListener]:
        if not self.cfg.reuse_port:
            return await trio.open_tcp_listeners(self.cfg.port, host=self.cfg.host)
        listeners = []
        infos = await trio.socket.getaddrinfo(
            self.cfg.host, self.cfg.port, type=trio.socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in infos:
            sock = trio.socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            await sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            listeners.append(trio.SocketListener(sock))
        return listeners


def _port(listener: trio.SocketListener) -> int:
    return int(listener.socket.getsockname()[1])


async def serve_stream(
    gateway: Hub, stream: trio.abc.Stream, *, parking: Parking | None = None
) -> None:
    """Serve one client's byte stream: the WebSocket handshake, then its session, to its end.
    The stream is closed on the way out, whatever happened. With ``parking``, a session waiting
    for its client's next bytes holds no read of its own (``parking``). One function for both:
    a waiting session's task holds every frame of its await chain."""
    try:
        accepted = await _handshake(gateway, stream)
        if accepted is None:
            return
        ws, vosk, credential = accepted
        live = gateway.open_session("vosk" if vosk else "websocket", credential)
        door = (VoskConnection if vosk else _Connection)(gateway, ws, live, parking)
        try:
            refused = gateway.seating.refusal(live)
            if refused is None:
                await door.serve()
            else:
                await door.last_words(live.session.fail(refused))
        finally:
            gateway.close_session(live)
    except Exception:  # what nobody foresaw ends this connection, never the door
        gateway.sampled.log("error", "connection_failed", door="websocket", exc_info=True)
    finally:
        await trio.aclose_forcefully(stream)


async def _handshake(
    gateway: Hub, stream: trio.abc.Stream
) -> tuple[ServerWebSocket, bool, str | None] | None:
    """The WebSocket handshake: the connection, whether it is vosk's protocol, and the key the
    client gave in the handshake; None if there is no WebSocket (the peer was answered)."""
    cfg = gateway.cfg
    # Twice the bound: a message over max_frame_bytes reaches the session, which says how
    # large it was; past twice it, the transport stops reading it (``MessageTooLarge``).
    try:
        ws = await accept(
            stream,
            max_message=2 * cfg.max_frame_bytes,
            timeout_s=cfg.handshake_timeout_s,
            send_timeout_s=cfg.send_timeout_s,
        )
    except Exception:  # a handshake nobody foresaw ends this connection, never the listener
        gateway.sampled.log("warning", "handshake_failed", exc_info=True)
        return None
    if ws is None:
        return None
    # vosk-server's protocol, for its clients, at /vosk; Katydid's own everywhere else.
    vosk = ws.path.split("?", 1)[0].rstrip("/") == "/vosk"
    # The key: a Bearer header, else (vosk) the query, else (native) start.api_key.
    credential = bearer(ws.headers)
    ws.forget_headers()
    if credential is None and vosk:
        credential = query_key(ws.path)
    return ws, vosk, credential


class _Connection(SessionDriver):
    def __init__(
        self, gateway: Hub, ws: ServerWebSocket, live: Live, parking: Parking | None
    ) -> None:
        super().__init__(gateway, live)
        self.ws = ws
        self.parking = parking

    async def deliver(self, event: ServerEvent) -> None:
        await self.ws.send_message(event.to_json())

    async def hang_up(self, close: Close) -> None:
        await self.ws.aclose(close.code, close.reason)

    def serve(self) -> Coroutine[Any, Any, None]:
        return self.drive(self._reader)  # not a coroutine of its own: a frame fewer

    async def _reader(self) -> None:
        s = self.session
        while not s.closed:
            parked = park_reader(self, self.ws, self.parking)  # no read of our own meanwhile
            if parked is not None and await parked is Wake.DEADLINE:
                await self.emit(s.tick(trio.current_time()))
                continue
            msg = await receive(self, self.ws, pieces=s.uploading)
            now = trio.current_time()
            if msg is None:
                continue
            if isinstance(msg, Piece):
                await self.emit(s.receive_bytes(msg.data, now, message_bytes=msg.size))
            elif isinstance(msg, bytes):
                seating = self.gateway.seating
                allowed = seating.partials_allowed(s.model, resumed=s.awaits_first_partial)
                await self.emit(s.receive_bytes(msg, now, partials_allowed=allowed))
            else:
                await self.emit(receive_text(s, msg, now))
            # Not held while the next message is awaited (a piece of an upload is 16 KB).
            msg = None
