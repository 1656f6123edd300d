"""The vosk-server-compatible WebSocket door: path ``/vosk`` on the WebSocket port.

vosk-server's protocol, as its clients speak it: an optional ``{"config": {"sample_rate": N}}``,
binary PCM (s16le mono), ``{"eof": 1}`` at the end. vosk-server answers every audio frame and
``eof`` with one JSON message (``config`` gets none), and its clients wait for that answer
before sending the next frame: here each audio frame is answered at once, with a finished utterance if one came back
since the last answer (``{"result": [{"conf", "start", "end", "word"}], "text": ...}``), else the
utterance in progress (``{"partial": ...}``). ``eof`` is answered, once every utterance is
transcribed, with the rest of the transcript as one result; then the server closes (1000).

Errors: vosk has no error message; Katydid sends ``{"error": message, "code": code}`` and
closes with the code's close code, as on its own protocol.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Coroutine
from typing import Any

import trio

from katydid import wire_json
from katydid.errors import ClientGone, ErrorCode, ProtocolError
from katydid.gateway.driver import SessionDriver
from katydid.gateway.events import ErrorEvent, Final, ServerEvent
from katydid.gateway.hub import Hub
from katydid.gateway.inputs import Stop
from katydid.gateway.live import Live
from katydid.gateway.outputs import Close
from katydid.gateway.parking import Parking, Wake
from katydid.gateway.ws_reading import park_reader, receive
from katydid.gateway.ws_transport import ServerWebSocket


def _result(finals: list[Final]) -> dict[str, Any]:
    words = [
        {"conf": 1.0, "start": w["start_s"], "end": w["end_s"], "word": w["word"]}
        for f in finals
        for seg in f.segments
        for w in seg.get("words", ())
    ]
    return {"result": words, "text": " ".join(f.text.strip() for f in finals).strip()}


class VoskConnection(SessionDriver):
    def __init__(
        self, gateway: Hub, ws: ServerWebSocket, live: Live, parking: Parking | None
    ) -> None:
        super().__init__(gateway, live)
        self.ws = ws
        self.parking = parking
        self.unsent: list[Final] = []  # finished utterances not yet answered
        self.partial = ""
        self.eof = False

    async def _say(self, message: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(message, ensure_ascii=False))

    async def deliver(self, event: ServerEvent) -> None:
        if isinstance(event, Final):
            if event.kind == "partial":
                self.partial = event.text.strip()
            else:
                self.unsent.append(event)
                self.partial = ""
        elif isinstance(event, ErrorEvent) and event.seq is None:
            await self._say({"error": event.message, "code": str(event.code)})

    async def hang_up(self, close: Close) -> None:
        if close.code == 1000:  # done: eof's answer, the rest of the transcript
            with contextlib.suppress(ClientGone):
                await self._say(_result(self.unsent))
            self.unsent = []
        await self.ws.aclose(close.code, close.reason)

    def serve(self) -> Coroutine[Any, Any, None]:
        return self.drive(self._reader)  # not a coroutine of its own: a frame fewer

    async def _start(self, sample_rate: int) -> bool:
        start = {
            "type": "start",
            "format": "pcm_s16le",
            "sample_rate": sample_rate,
            "partials": True,
            "word_timestamps": True,
        }
        await self.emit(self.session.start_with(start, trio.current_time()))
        return not self.session.closed

    async def _reader(self) -> None:
        s = self.session
        started = False
        rate = 16_000  # the stream's: the first config's, else 16 kHz
        while not s.closed:
            parked = park_reader(self, self.ws, self.parking)  # no read of our own meanwhile
            if parked is not None and await parked is Wake.DEADLINE:
                await self.emit(s.tick(trio.current_time()))
                continue
            msg = await receive(self, self.ws)
            now = trio.current_time()
            if msg is None:
                continue
            if self.eof:
                # After eof the stream is over (vosk-server stops reading there): late audio,
                # a second eof or a config is not an error that costs the first eof its
                # transcript (it closed 1008 before); all are let be, and eof's answer comes.
                continue
            if isinstance(msg, bytes):
                if not started:
                    started = await self._start(rate)
                    if not started:
                        return
                allowed = self.gateway.seating.partials_allowed(s.model)
                await self.emit(s.receive_bytes(msg, now, partials_allowed=allowed))
                if not s.closed:
                    # Bounded as every send: a client that sends and never reads was held
                    # for as long as it kept sending (the idle deadline never came).
                    await self.bounded(self._answer_frame)
                continue
            try:
                command = _command(msg)
            except ProtocolError as exc:
                await self.emit(s.fail(exc))
                return
            if "config" in command:
                config = command["config"]
                try:
                    asked = _sample_rate(config)
                except ProtocolError as exc:
                    await self.emit(s.fail(exc))
                    return
                # The first config starts the session (a missing key is refused at once);
                # vosk-server takes more (a phrase list, words), so one that leaves the rate
                # as it is is let be, but the audio's rate cannot change once set. Not
                # answered: vosk-server answers audio and eof, never config, and its clients
                # read one answer per audio frame.
                if not started:
                    rate = asked
                    started = await self._start(rate)
                elif isinstance(config, dict) and "sample_rate" in config and asked != rate:
                    message = f"the sample rate cannot change once set (it is {rate} Hz)"
                    await self.emit(s.fail(ProtocolError(ErrorCode.BAD_MESSAGE, message)))
                    return
            elif "eof" in command:
                if self.eof:
                    continue
                if not started:
                    started = await self._start(rate)
                self.eof = True
                await self.emit(s.receive(Stop(), now))

    async def _answer_frame(self) -> None:
        if self.unsent:
            result, self.unsent = _result(self.unsent), []
            await self._say(result)
        else:
            await self._say({"partial": self.partial})


def _command(text: str) -> dict[str, Any]:
    """A vosk text message: ``config`` or ``eof``.

    Raises:
        ProtocolError: not JSON, or neither.
    """
    try:
        msg = wire_json.loads(text)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message is not valid JSON") from None
    if not isinstance(msg, dict) or not ({"config", "eof"} & msg.keys()):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, 'expected {"config": ...} or {"eof": 1}')
    return msg


def _sample_rate(config: Any) -> int:
    rate = config.get("sample_rate", 16_000) if isinstance(config, dict) else None
    # 16000.0 is a rate; 1e300 would become a 301-digit one, echoed in the range error.
    if isinstance(rate, float) and rate.is_integer() and abs(rate) < 2**31:
        rate = int(rate)
    if not isinstance(rate, int) or isinstance(rate, bool):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "config.sample_rate must be a whole number of Hz"
        )
    return rate
