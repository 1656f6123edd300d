"""The HTTP door (Starlette on hypercorn's trio worker): the OpenAI-compatible transcription API
over the same sessions as every other door, and the operator endpoints.

``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` take the ``openai`` SDK's
multipart form; the file becomes one session's upload (decoded, cut, fanned out over the
workers like a WebSocket file session), and the answer is the transcript in the asked
``response_format``, or with ``stream=true`` Server-Sent Events as finals arrive (queue position
as SSE comments while it waits). Errors are ``{"error": {"message", "type", "code"}}`` with the
HTTP status of the session's error code (429 with ``Retry-After`` for ``overloaded``).

Rule 1: the upload is bounded while it streams in (``max_file_bytes`` plus the form's overhead),
never buffered past the bound; a declared ``Content-Length`` over it is refused before reading.
Rule 2: a client that goes away is a session's ``client_gone``: its jobs are cancelled.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import trio
from starlette.datastructures import UploadFile
from starlette.requests import Request

from katydid.errors import ClientGone, ErrorCode
from katydid.gateway.credentials import WWW_AUTHENTICATE, bearer
from katydid.gateway.driver import LAST_WORDS_S, SessionDriver
from katydid.gateway.events import Done, ErrorEvent, Final, Queued, ServerEvent
from katydid.gateway.formats import RESPONSE_FORMATS, full_text, render
from katydid.gateway.http_wire import (
    CLOSE,
    DEFAULT_MODEL_ALIASES,
    Message,
    Receive,
    Scope,
    Send,
    answer,
    error_body,
    refusal,
)
from katydid.gateway.hub import Hub
from katydid.gateway.live import Live
from katydid.gateway.outputs import Close

_FORM_OVERHEAD = 64 * 1024  # multipart headers and the small fields beside the file
_STATUS = {
    ErrorCode.BAD_MESSAGE: 400,
    ErrorCode.UNSUPPORTED_OPTION: 400,
    ErrorCode.UNSUPPORTED_AUDIO: 415,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.QUOTA_EXCEEDED: 429,
}


class _UploadTooLarge(Exception):
    pass


class _UploadTooSlow(Exception):
    pass


class Transcribe:
    """A raw ASGI endpoint: it streams its own answer (SSE) and watches for a disconnect."""

    def __init__(self, gateway: Hub, task: str) -> None:
        self.gateway = gateway
        self.task = task

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await answer(send, 405, error_body(405, "method_not_allowed", "use POST"))
            return
        # The key before the upload: nobody without one sends us 500 MB.
        # Answered before the body is read: the connection is closed after the answer (a
        # client that reused it would have its next request cut off; the SDK's keep-alive did).
        refused = refusal(self.gateway, scope)
        if refused is not None:
            await answer(send, 401, refused, headers=[WWW_AUTHENTICATE, CLOSE])
            return
        cfg = self.gateway.cfg
        limit = cfg.max_file_bytes + _FORM_OVERHEAD
        too_large = error_body(413, "too_large", f"file over {cfg.max_file_bytes} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await answer(send, 413, too_large, headers=[CLOSE])
            return
        seen = 0
        read_all = False  # the body read to its end (a non-form one is not read at all)
        began = trio.current_time()

        async def bounded() -> Message:
            nonlocal seen, read_all
            # A body that stops coming is let go after idle_timeout_s, and one that trickles
            # (a byte every 5 s restarted that bound each time: 200 such uploads held their
            # connections for minutes) once its average rate, after a grace, falls under
            # upload_min_bytes_per_s: the moment it would, not at its next byte.
            starved = began + cfg.upload_rate_grace_s + seen / cfg.upload_min_bytes_per_s
            with trio.move_on_at(starved) as slow, trio.fail_after(cfg.idle_timeout_s):
                message = await receive()
            if slow.cancelled_caught:
                raise _UploadTooSlow
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _UploadTooLarge
            read_all = not message.get("more_body", False)
            return message

        try:
            form = await Request(scope, bounded).form(max_files=1, max_fields=16)
        except _UploadTooLarge:
            await answer(send, 413, too_large, headers=[CLOSE])
            return
        except trio.TooSlowError:
            message = f"no upload bytes for {cfg.idle_timeout_s:g} s"
            await answer(send, 408, error_body(408, "timeout", message), headers=[CLOSE])
            return
        except _UploadTooSlow:
            message = (
                f"upload slower than {cfg.upload_min_bytes_per_s} bytes/s on average after"
                f" {cfg.upload_rate_grace_s:g} s (upload_min_bytes_per_s)"
            )
            await answer(send, 408, error_body(408, "timeout", message), headers=[CLOSE])
            return
        except Exception as exc:  # a malformed form: python-multipart's and Starlette's errors
            body = error_body(400, "bad_message", f"not a form: {exc}")
            await answer(send, 400, body, headers=[CLOSE])
            return
        try:
            request = _form_request(form, self.task)
        except ValueError as exc:
            await form.close()
            # A body left unread (not a form: an audio/wav POST) ends the connection after the
            # answer, so it must say so: a client reusing it had its next request cut off.
            why, close = str(exc), [] if read_all else [CLOSE]
            if not read_all:
                kind = dict(scope["headers"]).get(b"content-type", b"none").decode("latin-1")
                why = f"the body must be multipart/form-data with a 'file' field, not {kind[:80]}"
            await answer(send, 400, error_body(400, "bad_message", why), headers=close)
            return
        credential = bearer(scope["headers"])
        try:
            await _HttpSession(self.gateway, send, receive, request, credential).run()
        finally:
            await form.close()


def _form_request(form: Any, task: str) -> dict[str, Any]:
    """The transcription request's fields, checked.

    Raises:
        ValueError: a missing file or a bad field.
    """
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise ValueError("the form needs a 'file' field with the audio file")
    fmt = str(form.get("response_format") or "json")
    if fmt not in RESPONSE_FORMATS:
        raise ValueError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}")
    granularities = set(form.getlist("timestamp_granularities[]")) | set(
        form.getlist("timestamp_granularities")
    )
    if not granularities <= {"word", "segment"}:
        raise ValueError("timestamp_granularities may hold 'word' and 'segment'")
    model = str(form.get("model") or "")
    start: dict[str, Any] = {
        "type": "start",
        "format": "wav",  # any container: the decoder reads what the file is
        "task": task,
        "word_timestamps": "word" in granularities,
    }
    if model not in DEFAULT_MODEL_ALIASES:
        start["model"] = model
    language = form.get("language")
    if task == "transcribe":
        start["language"] = str(language) if language else "auto"
    if form.get("prompt"):
        start["prompt"] = str(form.get("prompt"))
    stream_field = str(form.get("stream") or "false").lower()
    if stream_field not in ("true", "false", "1", "0"):
        raise ValueError("stream must be true or false")
    stream = stream_field in ("true", "1")
    temperature = form.get("temperature")
    if temperature is not None:
        try:
            if not 0.0 <= float(str(temperature)) <= 1.0:
                raise ValueError
        except ValueError:
            raise ValueError("temperature must be a number from 0 to 1") from None
    return {"file": file, "format": fmt, "start": start, "stream": stream}


class _HttpSession(SessionDriver):
    """One transcription request as one session."""

    def __init__(
        self,
        gateway: Hub,
        send: Send,
        receive: Receive,
        request: dict[str, Any],
        credential: str | None,
    ) -> None:
        self.live: Live = gateway.open_session("http", credential)
        super().__init__(gateway, self.live)
        self.send = send
        self.receive = receive
        self.request = request
        self.finals: list[Final] = []
        self.error: ErrorEvent | None = None
        self.done: Done | None = None
        self.streaming = False  # an SSE response has started
        self.closed = trio.Event()

    async def deliver(self, event: ServerEvent) -> None:
        if isinstance(event, Final) and event.kind == "final":
            text = event.text.strip()
            # Deltas joined as they come are the final text: a space before all but the first.
            delta = f" {text}" if any(f.text.strip() for f in self.finals) and text else text
            self.finals.append(event)
            if self.request["stream"] and text:
                await self._sse({"type": "transcript.text.delta", "delta": delta})
        elif isinstance(event, ErrorEvent):
            if event.seq is None or self.error is None:
                self.error = event
        elif isinstance(event, Done):
            self.done = event
        elif isinstance(event, Queued) and self.request["stream"]:
            await self._sse_start()
            await self._write(f": queued position={event.position} eta_s={event.eta_s:.1f}\n\n")

    async def hang_up(self, close: Close) -> None:
        self.closed.set()

    async def _sse_start(self) -> None:
        if not self.streaming:
            self.streaming = True
            await self._asgi_send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                    ],
                }
            )

    async def _sse(self, data: dict[str, Any]) -> None:
        await self._sse_start()
        await self._write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n")

    async def _write(self, text: str) -> None:
        await self._asgi_send(
            {"type": "http.response.body", "body": text.encode(), "more_body": True}
        )

    async def _asgi_send(self, message: Message) -> None:
        try:
            await self.send(message)
        except OSError:  # the ASGI spec's word for a client that is gone
            raise ClientGone from None

    async def run(self) -> None:
        s = self.session
        upload = self.request["file"]
        try:
            async with trio.open_nursery() as nursery:
                self.open(nursery)
                nursery.start_soon(self._watch_disconnect)
                now = trio.current_time()
                await self.emit(s.start_with(self.request["start"], now))
                if not s.closed:
                    size = upload.size if upload.size is not None else 0
                    upload.file.seek(0)
                    await self.emit(s.receive_file(upload.file, size, now))
                while not s.closed:
                    with trio.move_on_at(s.deadline):
                        await self.closed.wait()
                    if not s.closed:
                        await self.emit(s.tick(trio.current_time()))
                nursery.cancel_scope.cancel()
        finally:
            await self.finish()
            self.gateway.close_session(self.live)
        # Bounded, and to a client that may be gone: nobody is left to tell otherwise.
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(LAST_WORDS_S),
            contextlib.suppress(ClientGone, OSError),
        ):
            await self._respond()

    async def _watch_disconnect(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        await self.last_words(self.session.client_gone())
        self.end()

    async def _respond(self) -> None:
        error = self.error
        if self.streaming:
            if error is not None:
                await self._sse({"type": "error", "error": _error_dict(error)})
            else:
                await self._sse({"type": "transcript.text.done", "text": full_text(self.finals)})
            await self._asgi_send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if error is not None:
            status = _STATUS.get(error.code, 500)
            if error.code is ErrorCode.OVERLOADED and not self.gateway.bus.connected:
                status = 503
            headers = [WWW_AUTHENTICATE] if error.code is ErrorCode.UNAUTHORIZED else []
            if error.retry_after_s is not None:
                headers.append((b"retry-after", str(max(1, round(error.retry_after_s))).encode()))
            message = error.message if error.seq is None else f"chunk {error.seq}: {error.message}"
            await answer(
                send=self.send,
                status=status,
                body=error_body(status, str(error.code), message),
                headers=headers,
            )
            return
        if self.done is None:
            return  # the client is gone
        body, content_type = render(
            self.request["format"],
            self.finals,
            task=self.request["start"]["task"],
            duration_s=self.done.audio_s,
            words=self.request["start"]["word_timestamps"],
        )
        await answer(self.send, 200, body.encode(), content_type)


def _error_dict(error: ErrorEvent) -> dict[str, Any]:
    return {"message": error.message, "code": str(error.code)}
