"""``katydid model pull``'s transfer against a real local HTTP server (a stand-in for the hub):
the pinned checksum decides, a cut transfer is kept and resumed with a Range request, a 404, an
unreachable or silent endpoint is said in words. The payload is not a model here (install and
its smoke check are the integration tests'); the catalogue's own pins are checked for shape."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path

import pytest

from katydid.errors import ModelError
from katydid_worker import hub_models, model_pull
from katydid_worker.hub_models import HUB_FILES, HubFile
from tests.hub_server import PREFIX, closed_port, hub_server

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # several reads' worth, not a multiple of one
SHA = hashlib.sha256(PAYLOAD).hexdigest()
NAME = "fake"
FILES = {f"ggml-{NAME}.bin": PAYLOAD}


def _url(endpoint: str) -> str:
    return HubFile(NAME, len(PAYLOAD), SHA).url(endpoint)


def _get(endpoint: str, part: Path, *, size: int = len(PAYLOAD), sha256: str = SHA) -> None:
    model_pull.download(_url(endpoint), part, size=size, sha256=sha256, timeout_s=5)


def test_the_catalogue_pins_whisper_cpps_names_each_with_a_sha256() -> None:
    named = re.compile(r"(tiny|base|small|medium|large-v[123]|large-v3-turbo)(\.en)?(-q[58]_[01])?")
    assert all(named.fullmatch(name) for name in HUB_FILES), list(HUB_FILES)
    for name in ("tiny.en", "base", "small.en-q5_1", "medium", "large-v3-turbo-q5_0"):
        assert name in HUB_FILES
    for f in HUB_FILES.values():
        assert re.fullmatch(r"[0-9a-f]{64}", f.sha256), f
        assert f.size > 30_000_000, f
        assert f.english_only == f.name.split("-q")[0].endswith(".en")
    assert len({f.sha256 for f in HUB_FILES.values()}) == len(HUB_FILES)
    assert HUB_FILES["base.en-q5_1"].url("https://huggingface.co/") == (
        "https://huggingface.co/ggerganov/whisper.cpp/resolve/main/ggml-base.en-q5_1.bin"
    )


def test_the_endpoint_is_the_flag_else_hf_endpoint_else_the_hub(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert hub_models.endpoint() == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/hf/")
    assert hub_models.endpoint() == "https://mirror.example/hf"
    assert hub_models.endpoint("http://127.0.0.1:8080") == "http://127.0.0.1:8080"


def test_a_whole_transfer_with_the_pinned_checksum_is_kept(tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    with hub_server(FILES) as (endpoint, hub):
        _get(endpoint, part)
    assert part.read_bytes() == PAYLOAD
    assert hub.requests == [(PREFIX + f"ggml-{NAME}.bin", None)]


def test_a_wrong_checksum_is_refused_and_the_file_deleted(tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    with hub_server(FILES) as (endpoint, _), pytest.raises(ModelError) as info:
        _get(endpoint, part, sha256="0" * 64)
    assert f"its sha256 is {SHA}, the catalogue pins {'0' * 64}" in str(info.value)
    assert "the download was deleted" in str(info.value)
    assert not part.exists()


def test_a_file_of_another_size_is_refused_before_its_body(tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    with hub_server(FILES) as (endpoint, _), pytest.raises(ModelError, match="not the same file"):
        _get(endpoint, part, size=len(PAYLOAD) + 1)
    assert not part.exists()


def test_a_cut_transfer_is_kept_and_resumed_with_a_range_request(tmp_path: Path) -> None:
    part, cut = tmp_path / "x.part", 1_500_000
    with hub_server(FILES) as (endpoint, hub):
        hub.cut_at = cut
        with pytest.raises(ModelError) as info:
            _get(endpoint, part)
        message = str(info.value)
        assert f"stopped at {cut} of {len(PAYLOAD)} bytes" in message
        assert f"the partial file is kept at {part}" in message
        assert "run the same command again to resume" in message
        assert part.stat().st_size == cut
        _get(endpoint, part)
    assert part.read_bytes() == PAYLOAD
    assert [r for _, r in hub.requests] == [None, f"bytes={cut}-"]


def test_a_server_that_ignores_range_sends_the_whole_file_again(tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(b"\0" * 1000)  # not even a prefix of the file: overwritten, not appended to
    with hub_server(FILES) as (endpoint, hub):
        hub.ignore_range = True
        _get(endpoint, part)
    assert part.read_bytes() == PAYLOAD
    assert [r for _, r in hub.requests] == ["bytes=1000-"]


def test_a_whole_partial_file_is_only_verified(tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(PAYLOAD)
    with hub_server(FILES) as (endpoint, hub):
        _get(endpoint, part)
        assert hub.requests == []
    part.write_bytes(PAYLOAD[:-1] + b"!")
    with hub_server(FILES) as (endpoint, _), pytest.raises(ModelError, match="not the published"):
        _get(endpoint, part)
    assert not part.exists()


def test_a_partial_file_longer_than_the_served_one_is_deleted(tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(PAYLOAD[:1000])
    shorter = {f"ggml-{NAME}.bin": PAYLOAD[:500]}
    with (
        hub_server(shorter) as (endpoint, _),
        pytest.raises(ModelError, match=r"has no byte 1000 \(HTTP 416\)"),
    ):
        _get(endpoint, part)
    assert not part.exists()


def test_a_missing_file_is_a_404_in_words(tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    with hub_server({}) as (endpoint, _), pytest.raises(ModelError) as info:
        _get(endpoint, part)
    assert str(info.value).startswith(f"{_url(endpoint)}: not found (HTTP 404)")
    assert not part.exists()


def test_an_unreachable_endpoint_names_the_url_and_the_way_out(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ModelError) as info:
        _get(endpoint, tmp_path / "x.part")
    message = str(info.value)
    assert message.startswith(f"cannot reach {_url(endpoint)} (")
    assert "--endpoint URL (or HF_ENDPOINT)" in message
    assert "katydid model import FILE" in message


def test_a_silent_endpoint_times_out(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does), answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ModelError, match=r"cannot reach .* \(timed out\)"):
            model_pull.download(
                _url(endpoint), tmp_path / "x.part", size=len(PAYLOAD), sha256=SHA, timeout_s=0.5
            )


def test_pull_refuses_names_without_a_pin(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"'huge' is not one of whisper.cpp's published") as info:
        model_pull.pull(tmp_path, "huge")
    assert "large-v3-turbo-q5_0" in str(info.value)
    with pytest.raises(ModelError, match=r"tiny.en-q4_0 is packaged: katydid model prepare"):
        model_pull.pull(tmp_path, "tiny.en-q4_0")
    assert list(tmp_path.iterdir()) == []


def test_pull_with_a_wrong_pin_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    catalogue = {NAME: HubFile(NAME, len(PAYLOAD), "f" * 64)}
    with hub_server(FILES) as (endpoint, _), pytest.raises(ModelError, match="was deleted"):
        model_pull.pull(tmp_path, NAME, endpoint=endpoint, catalogue=catalogue)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_says_a_404_in_words_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from katydid import cli
    from katydid.cli import main

    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    with hub_server({}) as (endpoint, _):
        argv = ["--model-dir", str(tmp_path), "model", "pull", "tiny.en", "--endpoint", endpoint]
        assert main(argv) == 1
    err = capsys.readouterr().err
    url = HUB_FILES["tiny.en"].url(endpoint)
    assert f"katydid: error: {url}: not found (HTTP 404)" in err
