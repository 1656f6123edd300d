"""The native WebSocket door (protocol v1): trio-websocket frames in and out of a ``Session``.

One nursery per connection: a reader (client frames, and the clock: it waits for the next frame
until the session's deadline), a writer (what the bus reports: results, dead jobs, queue state),
and, for an upload after ``stop``, a decoder. trio-websocket's exceptions are mapped here, at the
edge, to session inputs (``client_gone``); nothing past this module sees them.

Rule 1: no connection-count limit; every bound is the session's.
Rule 2: a client that does not read blocks only its own sends, and is cut off after
``send_timeout_s``; one that does not write times out by the session's deadlines.
"""

from __future__ import annotations

import socket
from typing import IO

import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer

from katydid.audio import DecodedStream
from katydid.config import Config
from katydid.errors import AudioError, ErrorCode, ProtocolError
from katydid.gateway.outputs import Close, Decode, Output, Publish, Send
from katydid.gateway.server import Gateway, Live, apply
from katydid.gateway.session import Phase

log = structlog.get_logger("katydid.gateway")
_LAST_WORDS_S = 2.0  # for the error and close frames of a session that is ending anyway


class WebSocketDoor:
    """Listens on ``cfg.host:cfg.port`` and serves each connection as a session."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.cfg: Config = gateway.cfg
        self.port: int | None = None
        self._accepting: trio.CancelScope | None = None
        self._sessions: trio.CancelScope | None = None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``started`` gets the bound port."""
        async with trio.open_nursery() as handlers:
            self._sessions = handlers.cancel_scope
            with trio.CancelScope() as accepting:
                self._accepting = accepting
                server = WebSocketServer(
                    self._handle,
                    await self._listeners(),
                    handler_nursery=handlers,
                    # Twice the bound: a frame over max_frame_bytes reaches the session,
                    # which answers too_large before closing with 1009; past twice it, the
                    # WebSocket layer closes with 1009 before it has read the frame whole.
                    max_message_size=2 * self.cfg.max_frame_bytes,
                    connect_timeout=self.cfg.handshake_timeout_s,
                    disconnect_timeout=5,
                )
                await handlers.start(server.run)
                self.port = int(server.port)
                log.info(
                    "gateway_listening",
                    host=self.cfg.host,
                    port=self.port,
                    gateway=self.gateway.gateway_id,
                )
                task_status.started(self.port)
                await trio.sleep_forever()

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

    async def _handle(self, request: WebSocketRequest) -> None:
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        await serve_connection(self.gateway, ws)


async def serve_connection(gateway: Gateway, ws: WebSocketConnection) -> None:
    """Serve one accepted WebSocket as one session, to its end."""
    live = gateway.open_session()
    try:
        await _Connection(gateway, ws, live).serve()
    finally:
        gateway.close_session(live)


class _Connection:
    def __init__(self, gateway: Gateway, ws: WebSocketConnection, live: Live) -> None:
        self.gateway = gateway
        self.ws = ws
        self.live = live
        self.session = live.session
        self.send_timeout_s = gateway.cfg.send_timeout_s
        self.nursery: trio.Nursery | None = None

    async def serve(self) -> None:
        s = self.session
        try:
            try:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._writer)
                    await self._reader()
            except* Exception as group:
                # A bug must end this session, never the gateway (a handler's exception would
                # reach the listener's nursery and stop every session).
                self.gateway.sampled.log(
                    "error", "session_failed", session_id=s.session_id, exc_info=group
                )
                failed = ProtocolError(ErrorCode.INTERNAL, "the gateway failed on this session")
                await self._last_words(s.fail(failed))
        finally:
            if not s.closed:
                # Cancelled from outside: the server is stopping (its grace is over).
                await self._last_words(s.shutdown() if self.gateway.stopping else s.client_gone())

    async def _last_words(self, outputs: list[Output]) -> None:
        """Outputs of a session that is ending anyway: bounded, shielded, best effort."""
        with trio.CancelScope(shield=True), trio.move_on_after(_LAST_WORDS_S):
            for out in self.gateway.carry_out(self.live, outputs):
                try:
                    if isinstance(out, Send):
                        await self.ws.send_message(out.event.to_json())
                    elif isinstance(out, Close):
                        await self.ws.aclose(out.code, out.reason)
                except ConnectionClosed:
                    return

    def _end(self) -> None:
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    async def _emit(self, outputs: list[Output]) -> None:
        """Carry out a session's outputs, in order."""
        for out in self.gateway.carry_out(self.live, outputs):
            if isinstance(out, Send):
                await self._send(out.event.to_json())
            elif isinstance(out, Publish):
                await self._emit(await self.gateway.publish(self.live, out))
            elif isinstance(out, Decode):
                assert self.nursery is not None
                self.nursery.start_soon(self._decode, out.upload)
            elif isinstance(out, Close):
                with trio.move_on_after(_LAST_WORDS_S):
                    try:
                        await self.ws.aclose(out.code, out.reason)
                    except ConnectionClosed:
                        pass
                self._end()
                return
            if self.session.closed and not isinstance(out, Send):
                return

    async def _send(self, text: str) -> None:
        try:
            with trio.fail_after(self.send_timeout_s):
                await self.ws.send_message(text)
        except trio.TooSlowError:
            stuck = ProtocolError(ErrorCode.TIMEOUT, "client does not read its results")
            await self._last_words(self.session.fail(stuck))
            self._end()
        except ConnectionClosed:
            await self._last_words(self.session.client_gone())
            self._end()

    async def _reader(self) -> None:
        s = self.session
        while not s.closed:
            if s.phase is Phase.STREAMING and not s.wants_audio:
                await self.live.wait_for_room()
                s.resumed(trio.current_time())
            msg: str | bytes | None = None
            with trio.move_on_at(s.deadline):
                try:
                    msg = await self.ws.get_message()
                except ConnectionClosed as exc:
                    # A frame past the WebSocket layer's own limit closes there with 1009.
                    too_large = getattr(exc.reason, "code", None) == 1009
                    await self._last_words(s.client_gone(too_large=too_large))
                    self._end()
                    return
            now = trio.current_time()
            if msg is None:
                await self._emit(s.tick(now))
            elif isinstance(msg, bytes):
                allowed = self.gateway.partials_allowed(s.model)
                await self._emit(s.receive_bytes(msg, now, partials_allowed=allowed))
            else:
                await self._emit(s.receive_text(msg, now))

    async def _writer(self) -> None:
        async for item in self.live.inbox:
            outputs = apply(self.session, item)
            self.live.progress.unpark_all()
            await self._emit(outputs)

    async def _decode(self, upload: IO[bytes]) -> None:
        """After stop: decode the upload block by block (off the event loop), publishing its
        chunks as they are cut. The session holds one decoded block and the chunk being cut,
        never the file's samples; publishing waits on the in-flight bound, so decoding goes at
        the pace of the workers."""
        s = self.session
        max_s = self.gateway.cfg.max_session_s
        try:
            stream = await trio.to_thread.run_sync(lambda: DecodedStream(upload, max_audio_s=max_s))
        except AudioError as exc:
            await self._emit(s.fail(ProtocolError(ErrorCode.UNSUPPORTED_AUDIO, str(exc))))
            return
        with stream:
            s.decoding(stream.duration_s)
            while True:
                await self.live.wait_for_room()
                if s.closed:
                    return
                # Not abandoned on cancel: the block's thread must be done with the decoder
                # before it is closed (a 10 s block decodes in milliseconds).
                try:
                    block = await trio.to_thread.run_sync(stream.next_block)
                except AudioError as exc:
                    await self._emit(s.fail(ProtocolError(ErrorCode.UNSUPPORTED_AUDIO, str(exc))))
                    return
                if block is None:
                    break
                await self._emit(s.decoded(block))
        await self._emit(s.decoded_end())
