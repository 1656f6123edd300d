"""The HTTP port (Starlette on hypercorn's trio worker): the app and its routes: the
OpenAI-compatible transcription endpoints (``http_transcribe.py``), the Realtime door
(``realtime.py``), the browser page, the model list, the operator endpoints, and the framing
check in front of them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from katydid.gateway.credentials import WWW_AUTHENTICATE
from katydid.gateway.http_transcribe import Transcribe
from katydid.gateway.http_wire import (
    CLOSE,
    DEFAULT_MODEL_ALIASES,
    ASGIApp,
    Receive,
    Scope,
    Send,
    answer,
    error_body,
    refusal,
)
from katydid.gateway.hub import Hub
from katydid.gateway.realtime import Realtime

_STATIC = Path(__file__).parent / "static"  # the browser page: no build step
_FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<circle cx="8" cy="8" r="7" fill="#3a7d44"/></svg>'
)


def build_app(gateway: Hub) -> ASGIApp:
    """The gateway's HTTP app: OpenAI routes and the operator routes."""

    def operator(path: str) -> Callable[[Request], Awaitable[Response]]:
        route = gateway.routes()[path]

        async def endpoint(_: Request) -> Response:
            r = route()
            return Response(r.body, r.status, media_type=r.content_type)

        return endpoint

    async def models(request: Request) -> Response:
        refused = refusal(gateway, request.scope)
        if refused is not None:
            name, value = WWW_AUTHENTICATE
            return Response(
                refused, 401, headers={name.decode(): value.decode()}, media_type="application/json"
            )
        offers = gateway.admission.offers()
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "katydid"} | o.to_dict()
            for name, o in offers.items()
        ]
        wanted = request.path_params.get("model_id")
        if wanted is None:
            body = json.dumps({"object": "list", "data": data})
            return Response(body, media_type="application/json")
        # GET /v1/models/{id}: the SDK's models.retrieve; the OpenAI names transcriptions take
        # for the default model are that model here too.
        default = gateway.admission.default_model
        found = [m for m in data if m["id"] == wanted] or [
            m | {"id": wanted}
            for m in data
            if wanted in DEFAULT_MODEL_ALIASES and m["id"] == default
        ]
        if not found:
            message = f"no model {wanted!r} is served here"
            return Response(
                error_body(404, "not_found", message), 404, media_type="application/json"
            )
        return Response(json.dumps(found[0]), media_type="application/json")

    async def page(_: Request) -> Response:
        return Response((_STATIC / "index.html").read_bytes(), media_type="text/html")

    async def favicon(_: Request) -> Response:
        # A browser asks for it on every visit: an icon, not a 404 in its console and our logs.
        return Response(_FAVICON, media_type="image/svg+xml")

    async def worklet(_: Request) -> Response:
        body = (_STATIC / "pcm-worklet.js").read_bytes()
        return Response(body, media_type="text/javascript")

    async def page_config(_: Request) -> Response:
        # Where the page's WebSocket goes (the port may have been chosen at start).
        port = gateway.websocket_port or gateway.cfg.port
        return Response(json.dumps({"websocket_port": port}), media_type="application/json")

    async def not_found(_: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "no such route" if status == 404 else str(getattr(exc, "detail", exc))
        code = "not_found" if status == 404 else "bad_message"
        return Response(error_body(status, code, message), status, media_type="application/json")

    return _OneFraming(
        Starlette(
            exception_handlers={404: not_found, 405: not_found},
            routes=[
                Route("/", page),
                Route("/static/pcm-worklet.js", worklet),
                Route("/favicon.ico", favicon),
                Route("/config.json", page_config),
                Route("/metrics", operator("/metrics")),
                Route("/healthz", operator("/healthz")),
                Route("/readyz", operator("/readyz")),
                Route("/v1/models", models),
                Route("/v1/models/{model_id:path}", models),
                Route("/v1/audio/transcriptions", Transcribe(gateway, "transcribe")),
                Route("/v1/audio/translations", Transcribe(gateway, "translate")),
                WebSocketRoute("/v1/realtime", Realtime(gateway)),
            ],
        )
    )


class _OneFraming:
    """A request with both ``Content-Length`` and ``Transfer-Encoding`` is answered 400 and its
    connection closed (RFC 9112 §6.1): the two framings disagree on where the body ends, so
    whatever follows on the connection may be a request smuggled past a proxy, and is never
    read as one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {name.lower() for name, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                message = "Content-Length and Transfer-Encoding together (RFC 9112 6.1)"
                body = error_body(400, "bad_message", message)
                # What the server took for its body is read first (a little, briefly):
                # hypercorn dropped the connection unanswered when the answer came while the
                # request's body and a pipelined request were still unread (3 tries in 10).
                with trio.move_on_after(1.0):
                    taken = 0
                    while taken < 65536:
                        event = await receive()
                        taken += len(event.get("body", b""))
                        if event["type"] != "http.request" or not event.get("more_body"):
                            break
                await answer(send, 400, body, headers=[CLOSE])
                return
        await self.app(scope, receive, send)
