"""The engine's calibration, kept per model and host: what ``Engine._calibrate`` measured (a
near-empty clip's full-window CPU time and each clip size's attempt budget), in a small JSON file
beside the model (``<model dir>/calibration/``), so that a worker that starts on a model this host
has measured before skips the measurement (~6.7 CPU s for tiny.en on an AMD EPYC).

The file is keyed by everything the measured values depend on (``calibration_key``): the model
file, the CPU and its SIMD features, the whisper.cpp build and binding, and the engine options
that reach a near-empty decode or the budgets. A file that is missing, unreadable, corrupt or
made for another key is ignored and measured over; the write is atomic (temporary file, then
``os.replace``) and a failed one is logged once per process and otherwise ignored: the cache
never fails an engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from katydid.cpu import cpu_model, cpu_simd_flags
from katydid_worker.engine_options import EngineOptions

# Bump when what ``Engine._calibrate`` measures changes (the clip it decodes, the passes, how a
# budget follows from a measurement): a file written by the old procedure is then a miss.
CALIBRATION_VERSION = 1
SUBDIR = "calibration"
_HEAD_BYTES = 1 << 20  # the model file's first MB is hashed (header, vocabulary, first weights)

# EngineOptions fields that cannot change a near-empty decode's cost nor the budgets: a miss on
# them would measure the same thing again. Every other field is in the key, so an option added
# later is in it unless someone decides here that it does not matter.
_NOT_IN_KEY = frozenset(
    {
        "clip_context",  # no calibration at all without it
        "ctx_margin_s",  # which size a clip gets, not what a size costs
        "temperature_fallback",  # full-window jobs only; calibration runs at temperature 0
        "speech_gate",
        "speech_pad_s",
        "max_redecodes",
        "calibration_cache",
        "pieces",  # which sizes a long clip's pieces get, not what a size costs
        "piece_min_s",
        "piece_max_s",
    }
)

log = logging.getLogger("katydid.calibration")
_write_failed_logged = False  # a failed write is logged once per process


@dataclass(frozen=True, slots=True)
class Calibration:
    """A near-empty clip's full-window CPU seconds, and a clip-sized attempt's CPU budget per
    size (``guardrails.attempt_budget_s``)."""

    full_window_s: float
    budgets_s: dict[int, float]


def _model_id(model_path: Path) -> dict[str, Any]:
    """The model file: its name, size and the sha256 of its first MB (not its mtime: a model
    prepared again, byte for byte the same, costs the same)."""
    with model_path.open("rb") as f:
        head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()
    return {"name": model_path.name, "size": model_path.stat().st_size, "head_sha256": head}


def _host() -> dict[str, Any]:
    """The CPU and the whisper.cpp build this process runs."""
    from importlib.metadata import PackageNotFoundError, version

    from katydid_worker.engine_build import build_info

    try:
        binding = version("pywhispercpp")
    except PackageNotFoundError:
        binding = "unknown"
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_simd_flags(),
        "build": build_info(),
        "pywhispercpp": binding,
    }


def calibration_key(model_path: Path, options: EngineOptions) -> dict[str, Any]:
    """Everything the calibration of ``model_path`` under ``options`` depends on, as JSON values
    (compared as they come back from a file).

    Raises:
        OSError: the model file cannot be read.
    """
    opts = {
        name: value
        for name, value in dataclasses.asdict(options).items()
        if name not in _NOT_IN_KEY
    }
    opts["clip_ctx_steps"] = sorted(options.clip_ctx_steps)
    key = {
        "version": CALIBRATION_VERSION,
        "model": _model_id(model_path),
        **_host(),
        "options": opts,
    }
    normalised: dict[str, Any] = json.loads(json.dumps(key, sort_keys=True))
    return normalised


def cache_file(model_path: Path, key: dict[str, Any]) -> Path:
    """Where the calibration for ``key`` lives: ``<model dir>/calibration/<model>-<digest>.json``
    (one file per key, so workers with different options do not overwrite each other's)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return model_path.parent / SUBDIR / f"{model_path.stem}-{digest}.json"


def _seconds(value: Any, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    seconds = float(value)
    if not (seconds > 0 and (math.isfinite(seconds) or (allow_inf and seconds == math.inf))):
        raise ValueError(f"not a positive time: {value!r}")
    return seconds


def load(path: Path, key: dict[str, Any]) -> Calibration | None:
    """The calibration stored at ``path`` for ``key``; None when there is none, or the file is
    unreadable, corrupt, or made for another key (or lacks one of the key's clip sizes)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        steps = key["options"]["clip_ctx_steps"]
        raw = data["budgets_s"]
        if not isinstance(raw, dict) or sorted(raw) != sorted(str(s) for s in steps):
            return None
        # A budget is infinite when the budget ratio is 1 or more (attempt_budget_s).
        budgets = {int(step): _seconds(raw[str(step)], allow_inf=True) for step in steps}
        return Calibration(_seconds(data["full_window_s"]), budgets)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(path: Path, key: dict[str, Any], calibration: Calibration) -> bool:
    """Write ``calibration`` for ``key`` to ``path`` atomically; False (logged once per
    process) when the directory cannot be made or written: the caller goes on without it."""
    global _write_failed_logged
    data = {
        "key": key,
        "full_window_s": calibration.full_window_s,
        "budgets_s": {str(step): s for step, s in sorted(calibration.budgets_s.items())},
    }
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if not _write_failed_logged:
            _write_failed_logged = True
            log.warning(
                "calibration_not_saved: %s (%s); every engine on this model measures it again",
                path,
                exc,
            )
        return False
