"""TLS for the gateway's listeners (WebSocket, HTTP, Wyoming): one server context from
``tls_cert_file`` and ``tls_key_file``, or None without them.

Rule: a certificate that cannot be used stops the server at start with the file and the reason in
words, never at the first client.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from katydid.config import Config
from katydid.errors import ConfigError


def tls_files(cfg: Config) -> tuple[str, str]:
    """The certificate and key paths, ``~`` expanded (for servers that load them themselves)."""
    return str(Path(cfg.tls_cert_file).expanduser()), str(Path(cfg.tls_key_file).expanduser())


def server_context(cfg: Config) -> ssl.SSLContext | None:
    """The listeners' TLS context (TLS 1.2 or later), or None if TLS is off.

    Raises:
        ConfigError: one of the two files set without the other, unreadable, or not a matching
            certificate chain and key in PEM.
    """
    if not cfg.tls_cert_file and not cfg.tls_key_file:
        return None
    if not (cfg.tls_cert_file and cfg.tls_key_file):
        raise ConfigError("TLS needs both tls_cert_file and tls_key_file")
    cert, key = Path(cfg.tls_cert_file).expanduser(), Path(cfg.tls_key_file).expanduser()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ConfigError(f"TLS: no such file {exc.filename}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"TLS: cannot use certificate {cert} with key {key} (PEM chain and its key): {exc}"
        ) from None
    return context
