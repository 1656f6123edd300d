"""The Wyoming door (Home Assistant's voice pipeline): TCP, ``wyoming_port``.

``describe`` → ``info`` (one asr program, Katydid's live models and their languages,
``supports_transcript_streaming``). A transcription: ``transcribe`` (``name`` = model,
``language``; optional) → ``audio-start`` (any ``rate``, ``width`` 1/2/4 bytes, ``channels``)
→ ``audio-chunk``... → ``audio-stop``; answered with ``transcript-start``, a
``transcript-chunk`` per final as it arrives, ``transcript-stop``, then ``transcript`` with the
whole text. Each ``audio-start`` begins a new session in the same queue as every other door;
one connection may carry several, one after another. Wyoming has no event for a queue position:
a client waits in silence. A refusal or failure is an ``error`` event (``text``, ``code``); the
connection stays open for the next transcription. Bytes that are not Wyoming events close the
connection (logged, sampled).
"""

from __future__ import annotations

import ipaddress
import ssl
from functools import partial
from typing import Any

import numpy as np
import structlog
import trio

from katydid.catalog import choose_model
from katydid.config import Config
from katydid.errors import ClientGone, ErrorCode, ProtocolError, listening
from katydid.gateway.driver import LAST_WORDS_S, SessionDriver
from katydid.gateway.events import Done, ErrorEvent, Final, ServerEvent
from katydid.gateway.hub import Hub
from katydid.gateway.inputs import Stop
from katydid.gateway.listening import accept_forever, tls
from katydid.gateway.outputs import Close
from katydid.gateway.session_queries import Phase
from katydid.gateway.wyoming_wire import FramingError, WyomingEvent, WyomingReader, encode

log = structlog.get_logger("katydid.gateway")
_MAX_LINE = 64 * 1024
_MAX_DATA = 64 * 1024


class WyomingDoor:
    """Listens on ``cfg.host:cfg.wyoming_port``; each connection is served by ``_Connection``."""

    def __init__(self, gateway: Hub, tls: ssl.SSLContext | None = None) -> None:
        self.gateway = gateway
        self.cfg: Config = gateway.cfg
        self.tls = tls
        self.networks = gateway.cfg.wyoming_networks()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with listening("Wyoming door", self.cfg.host, self.cfg.wyoming_port):
            tcp = await trio.open_tcp_listeners(self.cfg.wyoming_port, host=self.cfg.host)
        port = int(tcp[0].socket.getsockname()[1])
        log.info("wyoming_listening", host=self.cfg.host, port=port, tls=self.tls is not None)
        wrap = tls(self.tls) if self.tls is not None else None
        async with trio.open_nursery() as nursery:
            task_status.started(port)
            for listener in tcp:
                nursery.start_soon(
                    partial(
                        accept_forever,
                        listener,
                        nursery,
                        self._handle,
                        self.gateway.sampled,
                        wrap=wrap,
                    )
                )

    async def _handle(self, stream: trio.abc.Stream) -> None:
        try:
            if self._allowed(stream):
                await _Connection(self.gateway, stream).serve()
            else:
                refusal = WyomingEvent(
                    "error",
                    {"text": "this network may not use the Wyoming door", "code": "unauthorized"},
                )
                with trio.move_on_after(LAST_WORDS_S):
                    await stream.send_all(encode(refusal))
                    await _lingering_close(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # what nobody foresaw ends this connection, never the door
            self.gateway.sampled.log("error", "connection_failed", door="wyoming", exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)

    def _allowed(self, stream: trio.abc.Stream) -> bool:
        """The Wyoming protocol has no authentication: a peer's address must be in
        ``wyoming_allow`` (default: loopback only)."""
        tcp = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        if not isinstance(tcp, trio.SocketStream):
            return False
        try:
            peer = ipaddress.ip_address(tcp.socket.getpeername()[0])
        except (OSError, ValueError, IndexError):
            return False
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        if any(peer in net for net in self.networks):
            return True
        self.gateway.sampled.warning("wyoming_refused", peer=str(peer))
        return False


async def _lingering_close(stream: trio.abc.Stream) -> None:
    """Half-close, then read (and drop) what the client already sent, up to 64 KB: closing with
    unread input makes the kernel send a reset, which can reach the client before our last words.
    Bounded by the caller's time limit."""
    if isinstance(stream, trio.SocketStream):
        await stream.send_eof()
    drained = 0
    while drained < 64 * 1024 and (data := await stream.receive_some(16384)):
        drained += len(data)


class _Connection:
    def __init__(self, gateway: Hub, stream: trio.abc.Stream) -> None:
        self.gateway = gateway
        self.stream = stream
        self.reader = WyomingReader(
            max_line=_MAX_LINE, max_data=_MAX_DATA, max_payload=gateway.cfg.max_frame_bytes
        )
        self.send_lock = trio.StrictFIFOLock()
        self.request: dict[str, Any] = {}  # from the last `transcribe`
        self.current: _WyomingSession | None = None  # cleared by the reader once it is closed
        self.width = 2
        self.discarding = False  # the audio of a transcription that already ended in an error

    async def write(self, event: WyomingEvent) -> None:
        """Raises ClientGone: closed, or not reading (nothing taken for ``send_timeout_s``: a
        client that only sends `describe` and never reads held its connection for good)."""
        try:
            with trio.fail_after(self.gateway.cfg.send_timeout_s):
                async with self.send_lock:
                    await self.stream.send_all(encode(event))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            raise ClientGone from None

    async def _next_event(self) -> WyomingEvent | None:
        """The next event (None: the client closed the connection).

        Raises:
            FramingError: bytes that are not events.
        """
        while (event := self.reader.next_event()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.reader.feed(data)
        return event

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._read(nursery)
                except FramingError as exc:
                    self.gateway.sampled.warning("wyoming_garbage", error=str(exc))
                except (trio.BrokenResourceError, trio.ClosedResourceError, ClientGone):
                    pass
                nursery.cancel_scope.cancel()
        finally:
            if self.current is not None:
                with trio.CancelScope(shield=True):
                    await self.current.last_words(self.current.session.client_gone())

    async def _read(self, nursery: trio.Nursery) -> None:
        idle = self.gateway.cfg.idle_timeout_s
        while True:
            current = self.current
            if current is not None and current.session.closed:
                # Ended (its task may not have run yet): refused or failed, the rest of its
                # audio is ignored, not an error again per chunk.
                self.discarding = current.session.outcome != "ok"
                self.current = current = None
            deadline = current.session.deadline if current else trio.current_time() + idle
            event: WyomingEvent | None = None
            with trio.move_on_at(deadline) as waited:
                event = await self._next_event()
                if event is None:
                    return  # closed by the client
            if waited.cancelled_caught:
                if current is None:
                    return  # idle between transcriptions for idle_timeout_s
                await current.emit(current.session.tick(trio.current_time()))
                continue
            assert event is not None
            await self._on_event(event, current, nursery)

    async def _on_event(
        self, event: WyomingEvent, current: _WyomingSession | None, nursery: trio.Nursery
    ) -> None:
        kind = event.type
        if kind == "describe":
            await self.write(WyomingEvent("info", self._info()))
        elif kind == "transcribe":
            self.request = event.data
        elif kind == "audio-start":
            self.discarding = False
            if current is not None:
                # Its audio must not end the transcription in progress: once that one has had
                # its audio-stop, the chunks that follow are dropped without a word (below).
                self.discarding = True
                await self._error(ErrorCode.BAD_MESSAGE, "audio-start during a transcription")
                return
            await self._start(event.data, nursery)
        elif kind in ("audio-chunk", "audio-stop") and _stopped(current):
            # After audio-stop the transcription only waits for its transcript: a stray chunk
            # or stop (a client sending its next one too early) is refused alone and ignored,
            # where it failed the session and lost the transcript.
            if not self.discarding:
                self.discarding = kind == "audio-chunk"
                await self._error(ErrorCode.BAD_MESSAGE, f"{kind} after audio-stop (ignored)")
            elif kind == "audio-stop":
                self.discarding = False
        elif kind == "audio-chunk":
            if current is None and self.discarding:
                return
            if current is None:
                self.discarding = True  # one error for the whole transcription, not per chunk
                await self._error(ErrorCode.BAD_MESSAGE, "audio-chunk before audio-start")
                return
            try:
                pcm = _to_s16(event.payload or b"", self.width)
            except ProtocolError as exc:
                await current.emit(current.session.fail(exc))
                return
            await current.live.wait_for_room()
            s = current.session
            s.resumed(trio.current_time())
            allowed = self.gateway.seating.partials_allowed(s.model)
            await current.emit(s.receive_bytes(pcm, trio.current_time(), partials_allowed=allowed))
        elif kind == "audio-stop":
            if current is None and self.discarding:
                self.discarding = False
                return
            if current is None:
                await self._error(ErrorCode.BAD_MESSAGE, "audio-stop before audio-start")
                return
            await current.emit(current.session.receive(Stop(), trio.current_time()))
        # Other events (ping, pipeline events of other programs) are not for an ASR server.

    async def _error(self, code: ErrorCode, text: str) -> None:
        await self.write(WyomingEvent("error", {"text": text, "code": str(code)}))

    async def _start(self, data: dict[str, Any], nursery: trio.Nursery) -> None:
        width = data.get("width", 2)
        if type(width) is not int or width not in (1, 2, 4):  # (true == 1, 2.0 == 2 in Python)
            self.discarding = True
            await self._error(ErrorCode.UNSUPPORTED_AUDIO, f"sample width {width!r}: 1, 2 or 4")
            return
        self.width = width
        start: dict[str, Any] = {
            "type": "start",
            "format": "pcm_s16le",
            "sample_rate": data.get("rate", 16_000),
            "channels": data.get("channels", 1),
            "language": self.request.get("language") or "auto",
        }
        if self.request.get("name"):
            start["model"] = self.request["name"]
        self.request = {}
        live = self.gateway.open_session("wyoming")
        self.current = _WyomingSession(self.gateway, live, self)
        await nursery.start(self.current.run)
        await self.current.emit(self.current.session.start_with(start, trio.current_time()))

    def _info(self) -> dict[str, Any]:
        offers = self.gateway.admission.offers()
        default = choose_model(offers, None, self.gateway.admission.default_model)
        offers.setdefault(default.name, default)
        attribution = {"name": "Katydid", "url": "https://github.com/ggml-org/whisper.cpp"}
        models = [
            {
                "name": name,
                "attribution": attribution,
                "installed": True,
                "description": f"whisper.cpp {name}",
                "version": None,
                "languages": list(o.languages),
            }
            for name, o in offers.items()
        ]
        program = {
            "name": "katydid",
            "attribution": attribution,
            "installed": True,
            "description": "Katydid speech-to-text (whisper.cpp workers behind a queue)",
            "version": None,
            "models": models,
            "supports_transcript_streaming": True,
        }
        return {"asr": [program]}


class _WyomingSession(SessionDriver):
    def __init__(self, gateway: Hub, live: Any, conn: _Connection) -> None:
        super().__init__(gateway, live)
        self.conn = conn
        self.texts: list[str] = []
        self.language: str | None = None
        self.streaming = False
        self.over = trio.Event()

    async def deliver(self, event: ServerEvent) -> None:
        if isinstance(event, Final) and event.kind == "final":
            if not self.streaming:
                self.streaming = True
                self.language = event.language or None
                await self.conn.write(WyomingEvent("transcript-start", _lang(self.language)))
            self.texts.append(event.text.strip())
            await self.conn.write(WyomingEvent("transcript-chunk", {"text": event.text.strip()}))
        elif isinstance(event, ErrorEvent) and event.seq is None:
            await self.conn.write(
                WyomingEvent("error", {"text": event.message, "code": str(event.code)})
            )
        elif isinstance(event, Done):
            if not self.streaming:
                await self.conn.write(WyomingEvent("transcript-start", {}))
            await self.conn.write(WyomingEvent("transcript-stop"))
            text = " ".join(t for t in self.texts if t)
            await self.conn.write(WyomingEvent("transcript", {"text": text} | _lang(self.language)))

    async def hang_up(self, close: Close) -> None:
        self.over.set()  # the connection stays open for the next transcription

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.open(nursery)
                task_status.started()
                await self.over.wait()
                nursery.cancel_scope.cancel()
        finally:
            await self.finish()
            self.gateway.close_session(self.live)
            # The connection's reader sees the session closed and moves on (one place decides
            # whether the rest of its audio is discarded).


def _lang(language: str | None) -> dict[str, Any]:
    return {"language": language} if language else {}


def _to_s16(payload: bytes, width: int) -> bytes:
    """PCM of ``width`` bytes per sample as s16le.

    Raises:
        ProtocolError: not a whole number of samples.
    """
    if len(payload) % width:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"audio-chunk of {len(payload)} bytes, width {width}"
        )
    if width == 2:
        return payload
    if width == 1:  # unsigned 8-bit
        out = (np.frombuffer(payload, dtype=np.uint8).astype(np.int16) - 128) << 8
    else:
        out = (np.frombuffer(payload, dtype="<i4") >> 16).astype(np.int16)
    return out.astype("<i2").tobytes()


def _stopped(current: _WyomingSession | None) -> bool:
    """The transcription has had its audio-stop and waits for its transcript."""
    return current is not None and current.session.phase is Phase.STOPPED
