"""Reaching NATS: nats-py's connect arguments (servers, credentials, TLS) and its exceptions in
Katydid's words.

The ``nats_*`` modules of ``katydid.bus`` are the only ones that import nats-py:
``nats_connection`` (this one), ``nats_stream`` (the job stream and its consumers), ``nats_pull``
(a worker's pull lane), ``nats_admin`` (the operator's commands) and ``nats_bridge`` (the
gateway's thread-hosted connection).

Rule 1: library exceptions are translated here into ``NatsError`` and its subclasses
(``translate``); the other ``nats_*`` modules raise what it returns.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors

from katydid.config import Config
from katydid.errors import ConfigError, JobTooLarge, NatsError, StreamFull

# JetStream error codes (nats-server's errors.json), matched by code, not by text: a header too
# large also says "maximum", and was once reported to clients as a full queue.
_STORE_FAILED = 10077  # JSStreamStoreFailedF: with discard=new, "maximum messages/bytes exceeded"
_STORAGE_EXHAUSTED = 10047  # JSStorageResourcesExceededErr: the server's disk allowance
_TOO_LARGE = (10054, 10097)  # JSStreamMessageExceedsMaximumErr, JSStreamHeaderExceedsMaximumErr


def translate(exc: BaseException) -> NatsError:
    """Map a nats-py exception to Katydid's error tree."""
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code in _TOO_LARGE:
            return JobTooLarge(f"job too large for the stream: {exc.description}")
        if exc.err_code in (_STORE_FAILED, _STORAGE_EXHAUSTED):
            return StreamFull(f"job stream is full: {exc.description}")
        return NatsError(f"JetStream error {exc.err_code}: {exc.description}")
    if isinstance(exc, nats.errors.MaxPayloadError):
        return JobTooLarge(f"job too large for the server: {exc!r}")
    if isinstance(exc, nats.errors.TimeoutError | asyncio.TimeoutError | TimeoutError):
        return NatsError("NATS request timed out")
    if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
        return NatsError("JetStream did not answer (no stream or server down)")
    return NatsError(f"NATS error: {exc!r}")


def credentials(cfg: Config) -> dict[str, Any]:
    """nats-py's connect arguments for the configured credentials and TLS trust.

    Raises:
        ConfigError: a credentials or CA file that cannot be used.
    """
    out: dict[str, Any] = {}
    if cfg.nats_user:
        out |= {"user": cfg.nats_user, "password": cfg.nats_password}
    for setting, argument in (
        ("nats_creds_file", "user_credentials"),
        ("nats_nkey_seed_file", "nkeys_seed"),
    ):
        path = getattr(cfg, setting)
        if path:
            if not Path(path).expanduser().is_file():
                raise ConfigError(f"{setting}: no such file {path}")
            out[argument] = str(Path(path).expanduser())
    if cfg.nats_tls_ca_file:
        try:
            out["tls"] = ssl.create_default_context(cafile=cfg.nats_tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"nats_tls_ca_file {cfg.nats_tls_ca_file}: {exc}") from None
    return out


def servers(url: str) -> list[str]:
    """``nats_url`` as nats-py's server list: one URL, or several (a cluster's nodes) separated
    by commas. The client also learns a cluster's other nodes from the one it reaches."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def connect(cfg: Config, name: str, *, inbox_prefix: str = "_INBOX", **callbacks: Any) -> Any:
    """Connect nats-py with Katydid's bounds: reconnect forever, bounded connect and flush.
    ``inbox_prefix``: where replies come (a worker's own, ``worker_inbox_prefix``)."""
    return await nats.connect(
        servers(cfg.nats_url),
        name=name,
        connect_timeout=cfg.nats_connect_timeout_s,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        allow_reconnect=True,
        inbox_prefix=inbox_prefix,
        **credentials(cfg),
        **callbacks,
    )
