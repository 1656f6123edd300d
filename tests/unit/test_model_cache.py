"""The model cache as a registry: a pulled or imported model is known by its sidecar, so
``resolve``, ``prepare`` and ``statuses`` see it; a name nobody can serve names the command that
brings it; ``katydid model import`` refuses what it cannot take, in words. No real model here
(the integration tests import and pull one)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from katydid.cli_parser import MODEL_QUANTS
from katydid.errors import ModelError
from katydid_worker import models
from katydid_worker.ggml import QUANTS
from katydid_worker.model_import import default_name, import_model


def _fake(cache: Path, name: str, data: bytes = b"ggml" * 100, **meta: Any) -> Path:
    """A model file and its sidecar as ``install`` leaves them (the bytes are no model)."""
    path = models.model_path(cache, name)
    path.write_bytes(data)
    record = {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.with_suffix(".json").write_text(json.dumps(record | meta), encoding="utf-8")
    return path


def test_an_imported_model_is_resolved_listed_and_prepared_by_its_name(tmp_path: Path) -> None:
    path = _fake(tmp_path, "my-model", source="imported", english_only=True)
    assert models.is_prepared(tmp_path, "my-model", verify_hash=True)
    assert models.resolve(tmp_path, "my-model") == path
    assert models.prepare(tmp_path, "my-model") == path  # what `katydid serve` calls: a no-op
    assert list(models.cached(tmp_path)) == ["my-model"]
    last = models.statuses(tmp_path)[-1]
    assert (last.name, last.source, last.path) == ("my-model", "imported", path)
    assert (last.installed, last.prepared, last.english_only) == (True, True, True)
    assert [s.name for s in models.statuses(tmp_path)][:-1] == models.known_names()


def test_a_damaged_imported_model_is_not_taken_by_prepare(tmp_path: Path) -> None:
    path = _fake(tmp_path, "my-model", source="imported")
    path.write_bytes(b"GGML" * 100)  # same size, other bytes
    with pytest.raises(ModelError, match="not the file its sidecar recorded"):
        models.prepare(tmp_path, "my-model")
    path.write_bytes(b"ggml")  # another size: not in the cache at all
    with pytest.raises(ModelError, match="katydid model import"):
        models.resolve(tmp_path, "my-model")
    assert "my-model" not in models.cached(tmp_path)


def test_only_a_conversion_is_tied_to_the_converter_version(tmp_path: Path) -> None:
    _fake(tmp_path, "tiny.en", converter=models.CONVERTER_VERSION - 1)
    assert not models.is_prepared(tmp_path, "tiny.en")  # converted again by prepare
    _fake(tmp_path, "tiny.en", converter=models.CONVERTER_VERSION)
    assert models.is_prepared(tmp_path, "tiny.en")
    _fake(tmp_path, "small", source="pulled")
    assert models.is_prepared(tmp_path, "small")
    statuses = {s.name: s for s in models.statuses(tmp_path)}
    assert statuses["tiny.en"].source == "converted"
    assert statuses["small"].source == "pulled"
    assert statuses["base"].source == "package"


def test_a_name_not_in_the_cache_names_the_command_that_brings_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"is not prepared in .*; run: katydid model prepare base"):
        models.resolve(tmp_path, "base")
    with pytest.raises(ModelError, match=r"'small' is not in .*; run: katydid model pull small"):
        models.resolve(tmp_path, "small")
    with pytest.raises(ModelError, match=r"'small' is not in .*; run: katydid model pull small"):
        models.prepare(tmp_path, "small")  # no download at run time: it says how
    with pytest.raises(ModelError, match="unknown model 'huge'") as info:
        models.resolve(tmp_path, "huge")
    assert "katydid model import PATH --name huge" in str(info.value)
    assert "katydid model pull NAME" in str(info.value)


def test_import_takes_its_default_name_from_the_file() -> None:
    assert default_name(Path("/m/ggml-small.en-q5_1.bin")) == "small.en-q5_1"
    assert default_name(Path("/m/my-finetune.bin")) == "my-finetune"
    assert default_name(Path("/m/faster-whisper-small")) == "faster-whisper-small"


@pytest.mark.parametrize(
    ("name", "refusal"),
    [
        ("-x", "cannot route jobs"),
        ("with space", "cannot route jobs"),
        ("x.bin", "cannot route jobs"),
        ("a" * 65, "cannot route jobs"),
        ("tiny.en-q4_0", "is a packaged model's name"),
        ("taken", "is in .* already"),
    ],
)
def test_import_refuses_a_name_it_cannot_take(tmp_path: Path, name: str, refusal: str) -> None:
    _fake(tmp_path, "taken", source="imported")
    source = tmp_path / "model.bin"
    source.write_bytes(b"whatever")
    with pytest.raises(ModelError, match=refusal):
        import_model(tmp_path, source, name=name)


def test_import_refuses_what_is_no_model(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match="does not exist"):
        import_model(cache, tmp_path / "nothing.bin")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(ModelError, match=r"holds no model\.bin: not a CTranslate2"):
        import_model(cache, tmp_path / "empty-dir")
    wav = tmp_path / "speech.wav"
    wav.write_bytes(b"RIFF" + b"\0" * 100)
    with pytest.raises(ModelError, match=r"is not a whisper\.cpp ggml model"):
        import_model(cache, wav, name="speech")
    with pytest.raises(ModelError, match="--quant converts a CTranslate2 directory"):
        import_model(cache, wav, name="speech", quant="q8_0")
    assert not cache.exists() or not any(cache.iterdir())


def test_the_parser_offers_the_converters_weight_formats() -> None:
    assert MODEL_QUANTS == QUANTS
