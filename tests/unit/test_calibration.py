"""The engine's calibration cache (calibration.py): a hit skips the measurement, a miss measures
and writes, a corrupt or foreign file is measured over, an unwritable directory never fails.

The engine here is real but for whisper.cpp: loading is skipped and ``_run`` is a stub that
records each run's size and advances a fake CPU clock by a set cost per size, so the measured
values are known exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from katydid.config import Config
from katydid_worker import calibration
from katydid_worker.engine import Engine
from katydid_worker.engine_options import EngineOptions
from katydid_worker.guardrails import CLIP_CTX_STEPS, FULL_CTX, attempt_budget_s
from katydid_worker.whisper_contexts import WhisperContexts

# CPU seconds of a near-empty run per size (the full window's and five clip sizes').
COSTS = {FULL_CTX: 0.8, 384: 0.13, 448: 0.14, 512: 0.17, 576: 0.19, 640: 0.21}
HOST = {"cpu": "Test CPU 9000", "cpu_flags": ["avx", "avx2"], "build": "B1", "pywhispercpp": "1"}
MEASURING_RUNS = 3 * (1 + len(CLIP_CTX_STEPS))


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _StubEngine(Engine):
    """An Engine whose whisper.cpp costs ``COSTS`` CPU seconds per run, and which loads nothing."""

    clock: _Clock
    runs: list[int]

    def _run(self, audio: np.ndarray, *, audio_ctx: int, **_kwargs: Any) -> list[Any]:
        self.runs.append(audio_ctx)
        self.clock.now += COSTS[audio_ctx]
        return []


@pytest.fixture
def make_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    clock = _Clock()
    monkeypatch.setattr("katydid_worker.engine.time.process_time", clock)
    monkeypatch.setattr(calibration, "_host", lambda: dict(HOST))
    monkeypatch.setattr(calibration, "_write_failed_logged", False)

    def load(self: WhisperContexts, model_path: Path, options: EngineOptions | None) -> None:
        self.options = options or EngineOptions()
        self.model_path = model_path
        self.runs = []  # type: ignore[attr-defined]
        self.clock = clock  # type: ignore[attr-defined]

    monkeypatch.setattr(WhisperContexts, "__init__", load)

    def make(model: Path, **options: Any) -> _StubEngine:
        return _StubEngine(model, EngineOptions(speech_gate=False, **options))

    return make


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "ggml-tiny.en-q8_0.bin"
    path.parent.mkdir()
    path.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    return path


def _cache_files(model: Path) -> list[Path]:
    folder = model.parent / calibration.SUBDIR
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_a_miss_measures_and_writes_then_a_hit_reads_back_and_only_warms_up(
    make_engine: Any, model: Path
) -> None:
    first = make_engine(model)
    assert first.calibration == "measured"
    assert first.runs == [640] + [FULL_CTX, *CLIP_CTX_STEPS] * 3
    assert first.full_window_s == pytest.approx(COSTS[FULL_CTX])
    assert first.budgets_s == pytest.approx(
        {s: attempt_budget_s(COSTS[FULL_CTX], COSTS[s], 0.5) for s in CLIP_CTX_STEPS}
    )
    files = _cache_files(model)
    assert [f.name[: -len("-0123456789abcdef.json")] for f in files] == [model.stem]

    second = make_engine(model)
    assert second.calibration == "cached"
    # The clip context's warm-up at its largest size still runs; the measurement does not.
    assert second.runs == [640]
    assert second.full_window_s == first.full_window_s
    assert second.budgets_s == first.budgets_s
    assert _cache_files(model) == files  # nothing written, no temporary file left


def test_other_options_are_another_key_and_do_not_overwrite(make_engine: Any, model: Path) -> None:
    make_engine(model)
    two = make_engine(model, threads=2)
    assert two.calibration == "measured"
    assert len(_cache_files(model)) == 2
    assert make_engine(model).calibration == "cached"
    assert make_engine(model, threads=2).calibration == "cached"
    # Options that do not reach a near-empty decode share the file.
    assert make_engine(model, max_redecodes=0, speech_pad_s=0.1).calibration == "cached"


def test_infinite_budgets_round_trip(make_engine: Any, model: Path) -> None:
    measured = make_engine(model, budget_ratio=1000.0)
    assert set(measured.budgets_s.values()) == {math.inf}
    cached = make_engine(model, budget_ratio=1000.0)
    assert cached.calibration == "cached"
    assert cached.budgets_s == measured.budgets_s


def _foreign_key(key: dict[str, Any]) -> dict[str, Any]:
    return {**key, "cpu": "Another CPU"}


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda good: b"",
        lambda good: b"{not json",
        lambda good: b"[1, 2]",
        lambda good: json.dumps({**good, "key": _foreign_key(good["key"])}).encode(),
        lambda good: json.dumps({**good, "full_window_s": -1.0}).encode(),
        lambda good: json.dumps({**good, "full_window_s": "0.8"}).encode(),
        lambda good: json.dumps({**good, "full_window_s": float("nan")}).encode(),
        lambda good: json.dumps({**good, "budgets_s": {"384": 0.3}}).encode(),
        lambda good: json.dumps({**good, "budgets_s": {**good["budgets_s"], "640": 0}}).encode(),
        lambda good: json.dumps({k: v for k, v in good.items() if k != "full_window_s"}).encode(),
    ],
    ids=[
        "empty",
        "not-json",
        "not-an-object",
        "foreign-key",
        "negative",
        "string",
        "nan",
        "missing-size",
        "zero-budget",
        "no-full-window",
    ],
)
def test_a_corrupt_or_foreign_file_is_ignored_and_rewritten(
    make_engine: Any, model: Path, corrupt: Any
) -> None:
    make_engine(model)
    (path,) = _cache_files(model)
    good = json.loads(path.read_text(encoding="utf-8"))
    path.write_bytes(corrupt(good))

    again = make_engine(model)
    assert again.calibration == "measured"
    assert len(again.runs) == 1 + MEASURING_RUNS
    assert json.loads(path.read_text(encoding="utf-8")) == good
    assert make_engine(model).calibration == "cached"


def test_an_unwritable_directory_measures_logs_once_and_never_fails(
    make_engine: Any, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (model.parent / calibration.SUBDIR).write_text("a file where the directory goes")
    with caplog.at_level(logging.WARNING, logger="katydid.calibration"):
        first = make_engine(model)
        second = make_engine(model)
    assert first.calibration == second.calibration == "measured"
    assert second.budgets_s == first.budgets_s
    warnings = [r for r in caplog.records if r.name == "katydid.calibration"]
    assert len(warnings) == 1
    assert "calibration_not_saved" in warnings[0].getMessage()


def test_a_failed_replace_leaves_no_temporary_file(
    make_engine: Any, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: Any) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr("katydid_worker.calibration.os.replace", refuse)
    assert make_engine(model).calibration == "measured"
    assert _cache_files(model) == []


def test_an_unreadable_model_measures(
    make_engine: Any, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(_path: Path) -> dict[str, Any]:
        raise PermissionError("gone")

    monkeypatch.setattr(calibration, "_model_id", unreadable)
    assert make_engine(model).calibration == "measured"
    assert _cache_files(model) == []


def test_switched_off_it_measures_every_time_and_writes_nothing(
    make_engine: Any, model: Path
) -> None:
    make_engine(model)
    (path,) = _cache_files(model)
    before = path.read_bytes()
    off = make_engine(model, calibration_cache=False)
    assert off.calibration == "measured"
    assert len(off.runs) == 1 + MEASURING_RUNS
    assert _cache_files(model) == [path]
    assert path.read_bytes() == before
    assert Config.load(environ={"KATYDID_CALIBRATION_CACHE": "0"}).calibration_cache is False
    assert Config().calibration_cache is True


def test_no_clip_context_no_calibration(make_engine: Any, model: Path) -> None:
    engine = make_engine(model, clip_context=False)
    assert engine.calibration == "none"
    assert engine.runs == []
    assert _cache_files(model) == []


def _key(model: Path, **options: Any) -> dict[str, Any]:
    return calibration.calibration_key(model, EngineOptions(**options))


@pytest.mark.parametrize(
    "option",
    [
        {"threads": 2},
        {"beam_size": 3},
        {"language": "de"},
        {"initial_prompt": "Katydid."},
        {"word_timestamps": True},
        {"clip_ctx_steps": (384, 448)},
        {"budget_ratio": 0.4},
        {"entropy_thold": 2.0},
        {"logprob_thold": -0.5},
        {"no_speech_thold": 0.5},
    ],
)
def test_the_key_changes_with_each_option_a_near_empty_decode_depends_on(
    model: Path, monkeypatch: pytest.MonkeyPatch, option: dict[str, Any]
) -> None:
    monkeypatch.setattr(calibration, "_host", lambda: dict(HOST))
    base = _key(model)
    other = _key(model, **option)
    assert other != base
    assert calibration.cache_file(model, other) != calibration.cache_file(model, base)


def test_the_key_ignores_options_that_do_not_reach_the_measurement(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calibration, "_host", lambda: dict(HOST))
    base = _key(model)
    assert _key(model, clip_ctx_steps=tuple(reversed(CLIP_CTX_STEPS))) == base
    for name in calibration._NOT_IN_KEY:
        assert name in EngineOptions.__dataclass_fields__, name  # a renamed field is keyed again
    changed = _key(
        model,
        ctx_margin_s=2.0,
        temperature_fallback=False,
        speech_gate=False,
        speech_pad_s=0.1,
        max_redecodes=0,
        calibration_cache=False,
    )
    assert changed == base
    # Every other field is in the key.
    keyed = set(EngineOptions.__dataclass_fields__) - calibration._NOT_IN_KEY
    assert set(base["options"]) == keyed


@pytest.mark.parametrize("field", sorted(HOST))
def test_the_key_changes_with_the_cpu_and_the_build(
    model: Path, monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    monkeypatch.setattr(calibration, "_host", lambda: dict(HOST))
    base = _key(model)
    other_host = {**HOST, field: ["avx"] if field == "cpu_flags" else "other"}
    monkeypatch.setattr(calibration, "_host", lambda: other_host)
    assert _key(model) != base


def test_the_key_changes_with_the_model_file(
    model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(calibration, "_host", lambda: dict(HOST))
    base = _key(model)
    data = bytearray(model.read_bytes())
    # The same bytes elsewhere, under the same name: the same model (mtime is not in the key).
    twin = tmp_path / "elsewhere" / model.name
    twin.parent.mkdir()
    twin.write_bytes(bytes(data))
    os.utime(twin, ns=(1, 1))
    assert _key(twin) == base
    renamed = twin.with_name("ggml-other.bin")
    twin.rename(renamed)
    assert _key(renamed) != base
    data[1000] ^= 0xFF  # a byte of the first MB
    model.write_bytes(bytes(data))
    assert _key(model) != base
    model.write_bytes(bytes(data) + b"\0")  # the size
    assert _key(model) != base


def test_the_real_key_names_this_cpu_and_whisper_build(model: Path) -> None:
    key = _key(model)
    assert key["version"] == calibration.CALIBRATION_VERSION
    assert key["cpu"]
    assert isinstance(key["cpu_flags"], list)
    assert "COMPILER = " in key["build"]
    assert key["pywhispercpp"] != "unknown"
    assert key["model"]["size"] == model.stat().st_size
    assert json.loads(json.dumps(key)) == key
    assert dataclasses.asdict(EngineOptions())["threads"] == key["options"]["threads"]
