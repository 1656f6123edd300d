"""What ``katydid nats status`` says of session resumption (``spec/resume.md``): the records in
the ``KATYDID_SESSIONS`` bucket (sessions a client may still resume) and the results waiting in
``KATYDID_RESULTS``. Each is None in a deployment without it (no bucket, no stream)."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import nats.js.errors

from katydid.session_record import RESULTS_STREAM, SESSIONS_BUCKET


async def resumption_status(js: Any, timeout_s: float) -> dict[str, Any]:
    """``{"sessions": {...} | None, "results": {...} | None}``; a part this user may not read,
    or that did not answer within ``timeout_s``, says so in ``why``."""
    return {
        "sessions": await _sessions(js, timeout_s),
        "results": await _results(js, timeout_s),
    }


async def _sessions(js: Any, timeout_s: float) -> dict[str, Any] | None:
    try:
        info = await asyncio.wait_for(js.stream_info(f"KV_{SESSIONS_BUCKET}"), timeout_s)
    except nats.js.errors.NotFoundError:
        return None
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
        return {"bucket": SESSIONS_BUCKET, "records": None, "why": repr(exc)}
    # The stream's messages count an ended session's delete marker until it ages out: the
    # records are the keys that are not deleted (a headers-only walk of the bucket).
    records: int | None = 0
    why = ""
    if info.state.messages:
        try:
            kv = await asyncio.wait_for(js.key_value(SESSIONS_BUCKET), timeout_s)
            records = len(await asyncio.wait_for(kv.keys(), 4 * timeout_s))
        except nats.js.errors.NoKeysError:
            records = 0
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            records, why = None, f"keys not listed: {exc!r}"
    return {
        "bucket": SESSIONS_BUCKET,
        "records": records,
        "entries": int(info.state.messages),  # records and delete markers
        "ttl_s": float(info.config.max_age or 0.0),
        "allow_direct": bool(info.config.allow_direct),  # workers' check needs it
        "why": why,
    }


async def _results(js: Any, timeout_s: float) -> dict[str, Any] | None:
    try:
        info = await asyncio.wait_for(js.stream_info(RESULTS_STREAM), timeout_s)
    except nats.js.errors.NotFoundError:
        return None
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
        return {"name": RESULTS_STREAM, "messages": None, "bytes": None, "why": repr(exc)}
    return {
        "name": RESULTS_STREAM,
        "messages": int(info.state.messages),
        "bytes": int(info.state.bytes),
        "max_bytes": int(info.config.max_bytes or -1),
        "max_age_s": float(info.config.max_age or 0.0),
        "why": "",
    }
