"""What the HTTP door's routes share: ASGI's types, an answer in one piece, the OpenAI error
body, and the key check of a request."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from katydid.errors import ProtocolError
from katydid.gateway.credentials import bearer
from katydid.gateway.hub import Hub

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
CLOSE = (b"connection", b"close")
# The OpenAI model names clients send by default: the server's default model.
DEFAULT_MODEL_ALIASES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "")


def error_body(status: int, code: str, message: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


async def answer(
    send: Send,
    status: int,
    body: bytes,
    content_type: str = "application/json",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def refusal(gateway: Hub, scope: Scope) -> bytes | None:
    """The body of a 401 (with ``WWW_AUTHENTICATE``) for a request without a valid key, with a
    keys file configured; else None."""
    if not gateway.tenants.required:
        return None
    try:
        gateway.tenants.authenticate(bearer(scope["headers"]), "http")
    except ProtocolError as exc:
        return error_body(401, str(exc.code), exc.message)
    return None
