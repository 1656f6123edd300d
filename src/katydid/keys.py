"""API keys: the keys file, and looking a presented key up in it.

The file holds one key per line, only its SHA-256 (a key is 256 random bits, so a fast hash is
enough: nobody can search that space), its name, when it was made, its limits, and, once revoked,
when::

    # NAME SHA256 CREATED [max_sessions=N] [audio_s_per_hour=S] [max_queued_jobs=J] [revoked=T]
    alice 9f86d081884c7d65... 2026-11-30T12:00:00Z max_sessions=4 max_queued_jobs=8

Rule 1: the key itself is printed once, by ``katydid keys add``, and stored nowhere; logs name a
key by its name, never by the key or a part of it.
Rule 2: a malformed line is an error naming the file and the line (at start); a file that turns
bad while serving leaves the keys loaded before in force, and says why in the log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from katydid.errors import ConfigError

KEY_PREFIX = "kd_"
MAX_KEY_CHARS = 128  # a presented key longer than this is refused unread
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_HEADER = (
    "# katydid API keys (katydid keys add|list|revoke). One key per line:\n"
    "# NAME SHA256-OF-KEY CREATED [max_sessions=N] [audio_s_per_hour=S] [max_queued_jobs=J]"
    " [revoked=T]\n"
)
_LIMITS = {"max_sessions": int, "audio_s_per_hour": float, "max_queued_jobs": int}


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key's entry; a limit of None is no limit."""

    name: str
    digest: str  # SHA-256 of the key, hex
    created: str
    max_sessions: int | None = None
    audio_s_per_hour: float | None = None
    max_queued_jobs: int | None = None
    revoked: str | None = None

    def line(self) -> str:
        fields = [self.name, self.digest, self.created]
        for limit in _LIMITS:
            value = getattr(self, limit)
            if value is not None:
                fields.append(
                    f"{limit}={value:g}" if isinstance(value, float) else f"{limit}={value}"
                )
        if self.revoked is not None:
            fields.append(f"revoked={self.revoked}")
        return " ".join(fields)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parse_keys(text: str, source: str) -> dict[str, KeyRecord]:
    """The records of a keys file, by name.

    Raises:
        ConfigError: a malformed line (named: ``source:line``), or a name twice.
    """
    records: dict[str, KeyRecord] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        parts = line.split()
        if len(parts) < 3:
            raise ConfigError(f"{where}: expected NAME SHA256 CREATED [LIMIT=VALUE ...]")
        name, hexdigest, created, *extra = parts
        if not _NAME.match(name):
            raise ConfigError(f"{where}: bad key name {name[:70]!r}")
        if not _HEX.match(hexdigest):
            raise ConfigError(f"{where}: the second field must be a SHA-256 in hex (64 digits)")
        values: dict[str, object] = {}
        for item in extra:
            field, sep, value = item.partition("=")
            if not sep or field not in (*_LIMITS, "revoked"):
                raise ConfigError(
                    f"{where}: unknown field {item[:40]!r} (known: {', '.join(_LIMITS)}, revoked)"
                )
            if field == "revoked":
                values[field] = value
                continue
            try:
                number_value = _LIMITS[field](value)
            except ValueError:
                raise ConfigError(
                    f"{where}: {field} must be a number, not {value[:20]!r}"
                ) from None
            if not number_value >= 0:
                raise ConfigError(f"{where}: {field} must be >= 0")
            values[field] = number_value
        if name in records:
            raise ConfigError(f"{where}: key name {name!r} appears twice")
        records[name] = KeyRecord(name, hexdigest, created, **values)  # type: ignore[arg-type]
    return records


def read_keys(path: Path, *, missing_ok: bool = True) -> dict[str, KeyRecord]:
    """Raises: ConfigError (unreadable, malformed, or missing unless ``missing_ok``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ConfigError(
            f"the keys file {path} does not exist (katydid keys add NAME --keys-file {path}"
            " makes it)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the keys file {path}: {exc}") from None
    return parse_keys(text, str(path))


def write_keys(path: Path, records: dict[str, KeyRecord]) -> None:
    """Replace the file atomically, 0600 from the start (it never exists readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(_HEADER + "".join(r.line() + "\n" for r in records.values()))
    os.replace(tmp, path)


def add_key(
    path: Path,
    name: str,
    *,
    max_sessions: int | None = None,
    audio_s_per_hour: float | None = None,
    max_queued_jobs: int | None = None,
) -> str:
    """A new key named ``name`` (stored as its hash); returns the key, which exists nowhere else.

    Raises:
        ConfigError: a bad or existing name, a bad limit, or a malformed file.
    """
    if not _NAME.match(name):
        raise ConfigError(
            "a key name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    for limit, value in (
        ("max_sessions", max_sessions),
        ("audio_s_per_hour", audio_s_per_hour),
        ("max_queued_jobs", max_queued_jobs),
    ):
        if value is not None and not value >= 1:
            raise ConfigError(f"--{limit.replace('_', '-')} must be >= 1")
    records = read_keys(path)
    if name in records and records[name].revoked is not None:
        # Its record stays, so that a refused key is named in the log: the name stays with it.
        raise ConfigError(
            f"the key named {name!r} was revoked ({records[name].revoked}); its name stays"
            f" with it: pick another (e.g. {name}-2)"
        )
    if name in records:
        raise ConfigError(f"a key named {name!r} exists already (revoke it first, or pick a name)")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    records[name] = KeyRecord(
        name, digest(key), _utc_now(), max_sessions, audio_s_per_hour, max_queued_jobs
    )
    write_keys(path, records)
    return key


def revoke_key(path: Path, name: str) -> None:
    """Mark ``name`` revoked (kept, so a refusal can name it in the log).

    Raises:
        ConfigError: no such key, or a malformed file.
    """
    records = read_keys(path)
    if name not in records:
        raise ConfigError(f"no key named {name!r} in {path}")
    if records[name].revoked is None:
        records[name] = dataclasses.replace(records[name], revoked=_utc_now())
        write_keys(path, records)


class KeyFile:
    """The keys a server accepts, read from ``path`` and read again when it changes (checked at
    most once per ``check_s``) or on ``reload()`` (SIGHUP).

    Raises (at construction): ConfigError for a missing or malformed file (a server told to
    require keys from a file that is not there would refuse everyone).
    """

    def __init__(self, path: Path, *, check_s: float = 1.0) -> None:
        self.path = path
        self.check_s = check_s
        self._by_digest: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.last_error: str | None = None
        self._load(strict=True)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self, *, strict: bool) -> bool:
        stamp = self._file_stamp()
        try:
            # A file that vanished while serving is an operator's slip (or an editor's swap),
            # not "no keys": the keys loaded before stay in force.
            records = read_keys(self.path, missing_ok=False)
        except ConfigError as exc:
            if strict:
                raise
            self.last_error = str(exc)
            self._stamp = stamp  # do not re-read a bad file every second; its next change is
            return False
        self._by_digest = {r.digest: r for r in records.values()}
        self._stamp = stamp
        self.last_error = None
        return True

    def reload(self) -> bool:
        """Read the file again now; False (and the old keys kept) if it is malformed."""
        return self._load(strict=False)

    def refresh(self, now: float) -> bool | None:
        """Re-read the file if it changed since it was read: True/False as ``reload``, None if
        it was not re-read."""
        if now - self._checked < self.check_s:
            return None
        self._checked = now
        if self._file_stamp() == self._stamp:
            return None
        return self.reload()

    @property
    def names(self) -> list[str]:
        return sorted(r.name for r in self._by_digest.values())

    @property
    def active_names(self) -> list[str]:
        return sorted(r.name for r in self._by_digest.values() if r.revoked is None)

    def lookup(self, key: str) -> KeyRecord | None:
        """The record of a presented key (revoked ones included: the caller refuses them, by
        name), or None. The dict finds the candidate by the key's hash, which tells a timing
        observer nothing about any stored key; the final comparison is constant-time."""
        if not key or len(key) > MAX_KEY_CHARS:
            return None
        wanted = digest(key)
        record = self._by_digest.get(wanted)
        if record is None or not hmac.compare_digest(record.digest, wanted):
            return None
        return record
