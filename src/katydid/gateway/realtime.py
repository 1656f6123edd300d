"""The OpenAI Realtime API in transcription mode: a WebSocket at ``/v1/realtime?intent=
transcription`` on the HTTP port (hypercorn's WebSockets over ASGI), for the ``openai`` SDK's
``client.realtime.connect`` / ``client.beta.realtime.connect`` and the tools built on them.

A connection is a run of turns, each one session of the core (``_Turn``, a ``SessionDriver``):
the first ``input_audio_buffer.append`` starts a turn with the connection's settings (``pcm16``
is PCM at 24 kHz, resampled by the core; G.711 is expanded here), and its audio is cut into
utterances at the speaker's pauses by the core's own chunker (that is the server VAD); each
utterance is an item: ``input_audio_buffer.committed`` before its first event, a
``conversation.item.input_audio_transcription.delta`` per partial (what it adds) and a
``...completed`` with the final ``transcript``. ``input_audio_buffer.commit`` ends the turn (its
last utterance is cut and transcribed, and the turn ends once every item is answered); the next
append starts another, with the settings as they are then. A malformed event is answered with an
``error`` and the connection goes on; a turn's coded error (``overloaded``, ``too_large``,
``timeout``, ``unauthorized``...) is an ``error``, then the close code of the native protocol.

Rule: every bound of the native door holds here (``max_frame_bytes`` on an append's audio,
``idle_timeout_s``, ``send_timeout_s``, the in-flight bound as backpressure); an event's text is
refused unread past what ``max_frame_bytes`` of audio can take in base64.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import trio

from katydid.errors import CLOSE_CODES, ClientGone, ErrorCode, ProtocolError
from katydid.gateway import realtime_wire as wire
from katydid.gateway.credentials import bearer
from katydid.gateway.driver import SessionDriver
from katydid.gateway.events import Done, ErrorEvent, Final, ServerEvent
from katydid.gateway.http_wire import Receive, Scope, Send
from katydid.gateway.hub import Hub
from katydid.gateway.inputs import Stop
from katydid.gateway.live import Live
from katydid.gateway.outputs import Close
from katydid.gateway.session_queries import Phase

_JSON_OVERHEAD = 4096  # an append's event around its base64
_CLOSE = {str(code): close for code, close in CLOSE_CODES.items()} | {"shutdown": 1013}


class Realtime:
    """The raw ASGI endpoint of ``/v1/realtime``."""

    def __init__(self, gateway: Hub) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # (Routed here for WebSockets only: a plain request to the path is a 404.)
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        conn = _Connection(self.gateway, receive, send, bearer(scope["headers"]))
        try:
            intent = _intent(bytes(scope.get("query_string", b"")))
            if intent != "transcription":
                message = f"intent {intent!r} is not served here: connect with intent=transcription"
                await conn.refuse(wire.error("invalid_intent", message, "intent"), 1008)
                return
            if self.gateway.tenants.required:
                try:
                    self.gateway.tenants.authenticate(conn.credential, "realtime")
                except ProtocolError as exc:
                    await conn.refuse(_coded(exc.code, exc.message), exc.close_code)
                    return
            await conn.run()
        except ClientGone:
            return
        except Exception:  # what nobody foresaw ends this connection, never the server
            self.gateway.sampled.log("error", "connection_failed", door="realtime", exc_info=True)
            await conn.close(1011, "internal")


def _intent(query: bytes) -> str:
    try:
        values = parse_qs(query.decode("latin-1"), max_num_fields=32).get("intent")
    except ValueError:  # more fields than any client sends
        return ""
    return values[0] if values else ""


def _coded(code: ErrorCode, message: str, **more: Any) -> dict[str, Any]:
    """A session's coded error as an ``error`` event (``code`` the native protocol's)."""
    kind = "invalid_request_error"
    if code in (ErrorCode.OVERLOADED, ErrorCode.QUOTA_EXCEEDED):
        kind = "rate_limit_error"
    elif code in (ErrorCode.INTERNAL, ErrorCode.TIMEOUT):
        kind = "server_error"
    return wire.error(str(code), message, kind=kind, **more)


class _Connection:
    """One client's WebSocket: its settings, its turns, its reader."""

    def __init__(self, gateway: Hub, receive: Receive, send: Send, credential: str | None) -> None:
        self.gateway = gateway
        self.cfg = gateway.cfg
        self._receive = receive
        self._send = send
        self.credential = credential
        self.session_id = wire.new_id("sess")
        self.settings = wire.Settings()
        self.pause_ms = round(gateway.limits.chunk_pause_s * 1000)
        self.turn: _Turn | None = None  # the one taking audio
        # Every turn not over: the one taking audio and those finishing after a commit. At
        # most ``max_jobs_in_flight`` at once (each holds a job in flight at least): a client
        # that commits faster than its turns finish waits for one to end, as a session's reader
        # waits for room, instead of opening sessions without end on one connection.
        self.turns: set[_Turn] = set()
        self._turn_ended = trio.Event()
        self.last_item: str | None = None
        self.closed = False
        self.nursery: trio.Nursery | None = None
        limit = self.cfg.max_frame_bytes
        self.max_text = 4 * (limit // 3 + 1) + _JSON_OVERHEAD

    # --- sending ---

    async def send_event(self, event: dict[str, Any]) -> None:
        """One server event (unbounded: the caller bounds it).

        Raises:
            ClientGone: the connection is closed.
        """
        if self.closed:
            raise ClientGone
        text = json.dumps({"event_id": wire.new_id("event")} | event, ensure_ascii=False)
        try:
            await self._send({"type": "websocket.send", "text": text})
        except OSError:  # the ASGI spec's word for a client that is gone
            raise ClientGone from None

    async def say(self, event: dict[str, Any]) -> None:
        """A server event within ``send_timeout_s``; a client that does not take it is closed.

        Raises:
            ClientGone: the client is gone, or did not read.
        """
        with trio.move_on_after(self.cfg.send_timeout_s):
            await self.send_event(event)
            return
        await self.close(4008, "timeout")
        raise ClientGone

    async def refuse(self, event: dict[str, Any], code: int) -> None:
        """An ``error`` event, then the close (bounded: the client may not read)."""
        try:
            await self.say(event)
        finally:
            await self.close(code, str(event["error"]["code"]))

    async def close(self, code: int, reason: str) -> None:
        """Close the WebSocket (once) and end the connection's tasks."""
        if not self.closed:
            self.closed = True
            with trio.CancelScope(shield=True), trio.move_on_after(self.cfg.send_timeout_s):
                try:
                    await self._send({"type": "websocket.close", "code": code, "reason": reason})
                except Exception:  # already closed by the client, or broken
                    self.gateway.sampled.log("debug", "close_failed", door="realtime")
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def item(self) -> tuple[str, str | None]:
        """A new item's id and the one before it."""
        item, previous = wire.new_id("item"), self.last_item
        self.last_item = item
        return item, previous

    def _session(self, prefix: str, ga: bool, *, beta_name: bool) -> dict[str, Any]:
        """``session.created`` / ``.updated`` (``beta_name``: ``transcription_session.``), the
        session in the GA shape or the beta one."""
        kind = f"transcription_session.{prefix}" if beta_name else f"session.{prefix}"
        render = self.settings.ga_session if ga else self.settings.beta_session
        return {"type": kind, "session": render(self.session_id, self.pause_ms)}

    # --- reading ---

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await self.say(self._session("created", ga=False, beta_name=True))
                await self.say(self._session("created", ga=True, beta_name=False))
                await self._read()
                nursery.cancel_scope.cancel()
        except* ClientGone:
            pass
        finally:
            self.closed = True

    async def _next(self) -> dict[str, Any] | None:
        """The client's next ASGI message; None once ``idle_timeout_s`` passed with no turn
        (a turn is bounded by its session's own deadlines)."""
        turn = self.turn
        if turn is not None:
            s = turn.session
            if s.phase is Phase.STREAMING and not s.wants_audio:  # our backpressure
                await turn.live.wait_for_room()
                s.resumed(trio.current_time())
            return dict(await self._receive())
        with trio.move_on_after(self.cfg.idle_timeout_s):
            return dict(await self._receive())
        return None

    async def _read(self) -> None:
        while not self.closed:
            message = await self._next()
            if message is None:
                if not self.turns:
                    idle = f"no event for {self.cfg.idle_timeout_s:.0f} s"
                    await self.refuse(_coded(ErrorCode.TIMEOUT, idle), 4008)
                    return
                continue
            if message["type"] == "websocket.disconnect":
                self.closed = True
                return
            text = message.get("text")
            if text is None:
                hint = "audio goes in input_audio_buffer.append events (base64), not binary"
                await self.say(wire.error("invalid_event", hint))
                continue
            if len(text) > self.max_text:
                too_large = f"an event of {len(text)} characters: an append's audio is at most {self.cfg.max_frame_bytes} bytes"
                await self.refuse(_coded(ErrorCode.TOO_LARGE, too_large), 1009)
                return
            try:
                await self._event(wire.parse(text))
            except wire.WireError as exc:
                event_id = _event_id(text)
                await self.say(wire.error(exc.code, exc.message, exc.param, event_id))

    async def _event(self, event: dict[str, Any]) -> None:
        """One client event.

        Raises:
            wire.WireError: it cannot be taken (the caller answers with an ``error``).
        """
        kind = event["type"]
        if kind == "input_audio_buffer.append":
            turn = self.turn
            fmt = turn.settings.audio_format if turn is not None else self.settings.audio_format
            await self._append(wire.audio(event, fmt))
        elif kind == "input_audio_buffer.commit":
            turn, self.turn = self.turn, None
            if turn is None:
                raise wire.WireError("input_audio_buffer_commit_empty", "no audio to commit")
            await turn.commit()
        elif kind == "input_audio_buffer.clear":
            # The core cannot withdraw audio it has taken: what was appended is transcribed.
            await self.say({"type": "input_audio_buffer.cleared"})
        elif kind in ("session.update", "transcription_session.update"):
            settings, ga = wire.update(self.settings, event)
            turn = self.turn
            if turn is not None and settings.fixed() != turn.settings.fixed():
                raise wire.WireError(
                    "session_in_progress",
                    "the audio format and transcription settings change at a commit, not"
                    " while audio is being appended",
                    "session",
                )
            self.settings = settings
            await self.say(self._session("updated", ga, beta_name=kind != "session.update"))
        else:
            raise wire.WireError(
                "unsupported_event", f"event type {kind!r} is not served here (transcription)", "type"
            )  # fmt: skip

    async def _append(self, pcm: bytes) -> None:
        turn = self.turn
        if turn is None:
            while len(self.turns) >= self.cfg.max_jobs_in_flight:
                await self._turn_ended.wait()
        now = trio.current_time()
        if turn is None:
            live = self.gateway.open_session("realtime", self.credential)
            turn = self.turn = _Turn(self, live, self.settings)
            self.turns.add(turn)
            assert self.nursery is not None
            self.nursery.start_soon(self._run_turn, turn)
            await turn.emit(turn.session.start_with(self.settings.start_fields(), now))
        s = turn.session
        if s.closed:
            return
        allowed = self.gateway.seating.partials_allowed(s.model)
        await turn.emit(s.receive_bytes(pcm, now, partials_allowed=allowed))

    async def _run_turn(self, turn: _Turn) -> None:
        try:
            await turn.drive(turn.watch)
        finally:
            self.turns.discard(turn)
            self._turn_ended.set()
            self._turn_ended = trio.Event()
            if self.turn is turn:
                self.turn = None
            self.gateway.close_session(turn.live)
            outcome = turn.session.outcome
            if outcome != "ok":  # its close may not have been sent (a client that did not read)
                await self.close(_CLOSE.get(outcome, 1011), outcome)


def _event_id(text: str) -> str | None:
    try:
        event_id = json.loads(text).get("event_id")
    except (ValueError, AttributeError):
        return None
    return event_id if isinstance(event_id, str) else None


def _completed(item: str, transcript: str, seconds: float) -> dict[str, Any]:
    return {
        "type": "conversation.item.input_audio_transcription.completed",
        "item_id": item,
        "content_index": 0,
        "transcript": transcript,
        "usage": {"type": "duration", "seconds": round(seconds, 3)},
    }


class _Turn(SessionDriver):
    """One session of the core: the audio from an append to a commit."""

    def __init__(self, conn: _Connection, live: Live, settings: wire.Settings) -> None:
        super().__init__(conn.gateway, live)
        self.conn = conn
        self.settings = settings
        self.items: list[str] = []  # utterance (chunk seq, from 0) -> its item
        self.said: dict[int, str] = {}  # what its deltas said
        self.answered: set[int] = set()  # the utterances completed or failed

    async def watch(self) -> None:
        """The turn's own task: its deadlines (no audio for ``idle_timeout_s``, no result for
        ``result_timeout_s``), until it ends."""
        s = self.session
        while not s.closed:
            await trio.sleep_until(s.deadline)
            await self.emit(s.tick(trio.current_time()))

    async def commit(self) -> None:
        """``input_audio_buffer.commit``: the utterance in progress is an item from now (its
        ``completed`` may say ""), and the turn's audio is over."""
        await self.bounded(self._commit_tail)
        await self.emit(self.session.receive(Stop(), trio.current_time()))

    async def _commit_tail(self) -> None:
        await self.item(self.session.chunks_total)

    async def item(self, seq: int) -> str:
        """The item of utterance ``seq``: ``input_audio_buffer.committed`` the first time, after
        those of the utterances before it not yet committed (items go in the order spoken)."""
        while len(self.items) <= seq:
            item, previous = self.conn.item()
            self.items.append(item)
            committed = {"type": "input_audio_buffer.committed", "item_id": item}
            await self.conn.send_event(committed | {"previous_item_id": previous})
        return self.items[seq]

    async def deliver(self, event: ServerEvent) -> None:
        send = self.conn.send_event
        if isinstance(event, Final):
            item = await self.item(event.seq)
            said = self.said.get(event.seq, "")
            more = wire.delta(said, event.text)
            if more:
                self.said[event.seq] = said + more
                delta = {"type": "conversation.item.input_audio_transcription.delta"}
                await send(delta | {"item_id": item, "content_index": 0, "delta": more})
            if event.kind == "final":
                self.said.pop(event.seq, None)
                self.answered.add(event.seq)
                await send(_completed(item, event.text.strip(), event.end_s - event.start_s))
        elif isinstance(event, ErrorEvent) and event.seq is not None:
            failed = {"type": "conversation.item.input_audio_transcription.failed"}
            error = _coded(event.code, event.message)["error"]
            self.answered.add(event.seq)
            await send(failed | {"item_id": await self.item(event.seq), "content_index": 0, "error": error})  # fmt: skip
        elif isinstance(event, Done):
            # Every committed item is answered: those with no text (silence) as "".
            for seq, item in enumerate(self.items):
                if seq not in self.answered:
                    await send(_completed(item, "", 0.0))
        elif isinstance(event, ErrorEvent):
            retry = {} if event.retry_after_s is None else {"retry_after_s": event.retry_after_s}
            await send(_coded(event.code, event.message, **retry))

    async def hang_up(self, close: Close) -> None:
        if close.code != 1000:  # a coded error: the connection ends with it
            await self.conn.close(close.code, close.reason)
