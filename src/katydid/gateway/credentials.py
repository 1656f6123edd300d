"""Where each door finds a client's API key: ``Authorization: Bearer KEY`` (every HTTP-based
door), a URL query's ``api_key`` (vosk clients, which cannot always set headers). Plain
functions of the request's parts; the key itself is checked at admission (``tenants.py``).

Rule: a key found here is never logged, and neither is the URL that carried it.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qs

from katydid.keys import MAX_KEY_CHARS

WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="katydid"')


def bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header ("" for one that is malformed or
    too long to be a key, which is then refused as unknown), or None without one."""
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"bearer" or len(token) > MAX_KEY_CHARS:
            return ""
        try:
            return token.strip().decode("ascii")
        except UnicodeDecodeError:
            return ""
    return None


def query_key(path: str) -> str | None:
    """``api_key`` from a request target's query string, if any."""
    _, sep, query = path.partition("?")
    if not sep:
        return None
    values = parse_qs(query, max_num_fields=32).get("api_key")
    return values[0] if values else None
