"""Models a user brings: ``katydid model pull`` from a stand-in for the hub (a real HTTP server
on a free port serving the real prepared tiny.en file), and ``katydid model import`` of a ggml
file and of a CTranslate2 directory; then the model is used by its name, by the command line
and by a running stack, on real speech.

The pulled file is pinned through the test catalogue ``pull`` takes (its checksum computed from
the served file); the real catalogue's pins are never loosened."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from katydid import client
from katydid.config import DEFAULT_MODEL
from katydid.errors import ModelError
from katydid.evaluation import Clip, read_manifest, wer
from katydid_worker import model_pull, models
from katydid_worker.hub_models import HUB_FILES, HubFile
from katydid_worker.model_import import import_model
from tests.hub_server import HubState, closed_port, hub_server
from tests.integration.stack import Stack, http_get, wait_until

pytestmark = pytest.mark.integration
# No ".en" in the name: that it knows English only is the smoke check's word, not the name's.
NAME = "tiny-test"


def _katydid(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "katydid", *args],
        capture_output=True,
        text=True,
        env=os.environ | {"KATYDID_MODEL_DIR": str(cache), "KATYDID_LOG_FORMAT": "json"} | env,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def jfk(speech_dir: Path) -> Clip:
    return next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "jfk.wav")


@pytest.fixture
def hub(model_path: Path) -> Iterator[tuple[str, HubState, dict[str, HubFile]]]:
    """``(endpoint, server state, catalogue pinning the file it serves)``."""
    data = model_path.read_bytes()
    pin = HubFile(NAME, len(data), hashlib.sha256(data).hexdigest())
    with hub_server({pin.filename: data}) as (endpoint, state):
        yield endpoint, state, {NAME: pin}


def test_a_pull_verifies_installs_and_registers_the_file(
    hub: tuple[str, HubState, dict[str, HubFile]], model_path: Path, tmp_path: Path
) -> None:
    endpoint, state, catalogue = hub
    path = model_pull.pull(tmp_path, NAME, endpoint=endpoint, catalogue=catalogue)
    assert path == models.model_path(tmp_path, NAME)
    assert models.file_sha256(path) == catalogue[NAME].sha256
    assert models.is_prepared(tmp_path, NAME, verify_hash=True)
    assert models.resolve(tmp_path, NAME) == path
    status = next(s for s in models.statuses(tmp_path) if s.name == NAME)
    assert (status.source, status.installed, status.prepared) == ("pulled", True, True)
    assert status.english_only  # what whisper.cpp said of the file in the smoke check
    assert models.sidecar_meta(tmp_path, NAME)["url"] == catalogue[NAME].url(endpoint)  # type: ignore[index]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, f"ggml-{NAME}.json"]
    # Pulled again: that very file is there, nothing is fetched.
    fetched = len(state.requests)
    assert model_pull.pull(tmp_path, NAME, endpoint=endpoint, catalogue=catalogue) == path
    assert len(state.requests) == fetched == 1


def test_a_pull_with_a_wrong_checksum_leaves_nothing(
    hub: tuple[str, HubState, dict[str, HubFile]], tmp_path: Path
) -> None:
    endpoint, _, catalogue = hub
    other = hashlib.sha256(b"another file").hexdigest()
    wrong = {NAME: HubFile(NAME, catalogue[NAME].size, other)}
    with pytest.raises(ModelError, match="the download was deleted") as info:
        model_pull.pull(tmp_path, NAME, endpoint=endpoint, catalogue=wrong)
    assert f"the catalogue pins {other}" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no model, no sidecar, no partial file
    with pytest.raises(ModelError, match="unknown model"):
        models.resolve(tmp_path, NAME)


def test_a_cut_pull_is_kept_and_the_next_one_resumes_it(
    hub: tuple[str, HubState, dict[str, HubFile]], tmp_path: Path
) -> None:
    endpoint, state, catalogue = hub
    cut = catalogue[NAME].size // 2
    state.cut_at = cut
    with pytest.raises(ModelError, match=r"kept at .*: run the same command again to resume"):
        model_pull.pull(tmp_path, NAME, endpoint=endpoint, catalogue=catalogue)
    part = model_pull.part_path(tmp_path, NAME)
    assert part.stat().st_size == cut
    assert not models.is_prepared(tmp_path, NAME)
    path = model_pull.pull(tmp_path, NAME, endpoint=endpoint, catalogue=catalogue)
    assert [r for _, r in state.requests] == [None, f"bytes={cut}-"]
    assert models.is_prepared(tmp_path, NAME, verify_hash=True)
    assert path.stat().st_size == catalogue[NAME].size
    assert not part.exists()


def test_the_cli_says_a_404_and_an_unreachable_endpoint_and_exits_1(
    hub: tuple[str, HubState, dict[str, HubFile]], tmp_path: Path
) -> None:
    endpoint, _, _ = hub  # it serves tiny-test only: the real catalogue's tiny.en is a 404 there
    proc = _katydid("model", "pull", "tiny.en", "--endpoint", endpoint, cache=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"{HUB_FILES['tiny.en'].url(endpoint)}: not found (HTTP 404)" in proc.stderr
    offline = f"http://127.0.0.1:{closed_port()}"
    proc = _katydid("model", "pull", "base.en", cache=tmp_path, HF_ENDPOINT=offline)
    assert proc.returncode == 1
    assert f"cannot reach {HUB_FILES['base.en'].url(offline)} (" in proc.stderr
    assert "--endpoint URL (or HF_ENDPOINT)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("ggml-*"))


def test_an_imported_ggml_file_is_listed_and_transcribes_by_its_name(
    model_path: Path, jfk: Clip, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    proc = _katydid("model", "import", str(model_path), "--name", "my-tiny", cache=cache)
    assert proc.returncode == 0, proc.stderr
    path = models.model_path(cache, "my-tiny")
    assert proc.stdout.strip() == str(path)
    assert "my-tiny knows English only" in proc.stderr
    assert models.file_sha256(path) == models.file_sha256(model_path)

    listed = _katydid("model", "list", cache=cache)
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith("my-tiny "))
    assert row.split()[1:5] == ["yes", "yes", "en", "imported"]

    said = _katydid(
        "--model", "my-tiny", "transcribe", "--local", "--json", str(jfk.path), cache=cache
    )
    assert said.returncode == 0, said.stderr
    text = " ".join(json.loads(line)["text"] for line in said.stdout.splitlines())
    assert wer(jfk.reference, text) <= 0.1, text

    mtime = path.stat().st_mtime_ns
    assert models.prepare(cache, "my-tiny") == path  # what `katydid serve` does first: a no-op
    assert path.stat().st_mtime_ns == mtime
    again = _katydid("model", "import", str(model_path), "--name", "my-tiny", cache=cache)
    assert again.returncode == 1
    assert "a model 'my-tiny' is in" in again.stderr


def test_an_imported_ctranslate2_directory_is_converted_as_prepare_converts(
    model_dir: Path, tmp_path: Path
) -> None:
    ct2 = models.SOURCES["tiny.en"].package_dirs()[0]  # faster-whisper's layout: model.bin & co
    quant = DEFAULT_MODEL.rsplit("-", 1)[1]
    name, path = import_model(tmp_path, ct2, name="tiny-ct2", quant=quant)
    assert (name, path) == ("tiny-ct2", models.model_path(tmp_path, "tiny-ct2"))
    meta = models.sidecar_meta(tmp_path, name)
    assert meta is not None
    assert (meta["source"], meta["quant"], meta["english_only"]) == ("imported", quant, True)
    # The converter is deterministic: the same file as the prepared default model.
    assert meta["sha256"] == models.sidecar_meta(model_dir, DEFAULT_MODEL)["sha256"]  # type: ignore[index]


async def test_a_stack_serves_an_imported_model_by_its_name(
    model_path: Path, jfk: Clip, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    import_model(cache, model_path, name="my-tiny")
    (tmp_path / "stack").mkdir()
    with Stack(tmp_path / "stack", cache, workers=["my-tiny"], model="my-tiny") as stack:

        def offered() -> dict[str, dict[str, Any]]:
            status, body = http_get(stack.metrics_url + "/v1/models")
            assert status == 200, body
            return {m["id"]: m for m in json.loads(body)["data"]}

        wait_until(lambda: offered()["my-tiny"]["workers"] == 1, 30, "my-tiny's heartbeat")
        # English only, as its worker announced (the name alone would have said multilingual).
        assert offered()["my-tiny"]["languages"] == ["en"]
        res = await client.transcribe(
            stack.url, jfk.path.read_bytes(), fmt="wav", options={"model": "my-tiny"}
        )
    ready = res.events[0]
    assert (ready["type"], ready["model"]) == ("ready", "my-tiny")
    assert wer(jfk.reference, res.text) <= 0.1, res.text
