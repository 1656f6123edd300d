"""``katydid model import PATH [--name NAME]``: a model the user brings, into the cache by name.

PATH is a whisper.cpp ggml file (copied as it is) or a CTranslate2 Whisper directory, as
faster-whisper uses (converted by this project's converter, ``--quant`` as ``prepare`` writes).
Either way it is validated and installed as ``prepare`` installs a converted model
(``models.install``), and is used by its name from then on: ``--model NAME``, ``--workers
NAME=N``, ``katydid model list``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from katydid.errors import ModelError
from katydid.messages import is_model_name
from katydid_worker.ggml_check import check_ggml
from katydid_worker.hub_models import HUB_FILES
from katydid_worker.models import (
    CONVERTER_VERSION,
    IMPORTED,
    SOURCES,
    convert,
    file_sha256,
    install,
    is_prepared,
    model_path,
    split_name,
)


def default_name(path: Path) -> str:
    """``/x/ggml-small.en-q5_1.bin`` -> ``small.en-q5_1``; a directory: its name."""
    return path.name.removesuffix(".bin").removeprefix("ggml-") if path.name else "custom"


def _check_name(cache_dir: Path, name: str) -> None:
    if not is_model_name(name) or name.endswith(".bin"):
        raise ModelError(
            f"model name {name!r} cannot route jobs: letters, digits, '.', '_' and '-' (at most"
            " 64, starting with a letter or digit, not ending in .bin); choose one with --name"
        )
    if split_name(name)[0] in SOURCES and name not in HUB_FILES:
        raise ModelError(
            f"{name!r} is a packaged model's name (katydid model prepare {name}); choose another"
            " with --name"
        )
    if is_prepared(cache_dir, name):
        raise ModelError(
            f"a model {name!r} is in {cache_dir} already ({model_path(cache_dir, name)}); choose"
            " another name with --name, or delete that file and its .json first"
        )


def import_model(
    cache_dir: Path,
    path: Path,
    *,
    name: str | None = None,
    quant: str | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> tuple[str, Path]:
    """Bring the ggml file or CTranslate2 directory ``path`` into ``cache_dir`` as ``name``
    (default: ``default_name``). A name of whisper.cpp's published files (``small.en-q5_1``)
    takes only that very file (its pinned sha256): a download made elsewhere, brought here.

    Returns:
        The model's name and the path of its installed ggml file.

    Raises:
        ModelError: the path is not a model, the name is taken or cannot route jobs, or the
            model fails validation.
    """
    path = path.expanduser()
    name = name or default_name(path.resolve())
    _check_name(cache_dir, name)
    origin = str(path.resolve())
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ModelError(
                f"{path} holds no model.bin: not a CTranslate2 (faster-whisper) model directory"
            )
        if name in HUB_FILES:
            raise ModelError(
                f"{name!r} names whisper.cpp's published file, which a conversion is not;"
                " choose another with --name"
            )
    elif not path.is_file():
        raise ModelError(f"{path} does not exist")
    elif quant is not None:
        raise ModelError(
            "--quant converts a CTranslate2 directory; a ggml file is imported as it is"
        )
    else:
        check_ggml(path)  # before copying what may be gigabytes of something else
        hub = HUB_FILES.get(name)
        if hub is not None and file_sha256(path) != hub.sha256:
            raise ModelError(
                f"{name!r} names whisper.cpp's published file and {path} is not it (its sha256"
                f" is not the pinned {hub.sha256}); choose another name with --name"
            )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".import-") as scratch:
        tmp = Path(scratch) / model_path(cache_dir, name).name
        meta: dict[str, Any] = {"source": IMPORTED, "origin": origin}
        if path.is_dir():
            progress(f"converting {path} ({quant or 'f16'}) to {tmp.name}")
            convert(path, tmp, quant or "f16")
            meta |= {"converter": CONVERTER_VERSION, "quant": quant or "f16"}
        else:
            progress(f"copying {path} into {cache_dir}")
            shutil.copyfile(path, tmp)
        meta["english_only"] = ".en" in name  # until the smoke check says
        return name, install(cache_dir, name, tmp, meta, progress=progress)
