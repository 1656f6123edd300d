"""The browser page in a real headless Chromium (Debian's chromium and chromium-driver, driven
by selenium): the jfk clip fed as the microphone, and the same clip as a file upload. The test
installs Chromium with apt where it can (root, a package registry), and skips saying why where
it cannot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from katydid.evaluation import Clip, read_manifest, wer
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

webdriver = pytest.importorskip("selenium.webdriver")


def _chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installed with apt if missing and possible."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and this user cannot apt-get it")
    proc = subprocess.run(
        ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
        capture_output=True, text=True, timeout=900, check=False,
        env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"},
    )  # fmt: skip
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip(f"apt-get could not install chromium: {proc.stderr[-500:]}")
    return found  # type: ignore[return-value]


@pytest.fixture(scope="module")
def jfk(speech_dir: Path) -> Clip:
    return next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "jfk.wav")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("browser"), model_dir, workers=2) as s:
        yield s


@pytest.fixture
def browser(jfk: Clip) -> Iterator[object]:
    chromium, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream",  # grant the microphone without asking
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={jfk.path}%noloop",  # the clip is the microphone
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    drv = webdriver.Chrome(options=options, service=service)
    try:
        yield drv
    finally:
        drv.quit()


def _wait(drv: object, condition: object, timeout_s: float, what: str) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition(drv)  # type: ignore[operator]
        if value:
            return str(value)
        time.sleep(0.2)
    status = drv.find_element("id", "status").text  # type: ignore[attr-defined]
    raise AssertionError(f"timed out waiting for {what}; status: {status!r}")


def _transcript(drv: object) -> str:
    text = drv.find_element("id", "transcript").text  # type: ignore[attr-defined]
    return re.sub(r"^\d+:\d\d\.\d\s*", "", str(text), flags=re.M)  # the time in front of each


def _status(drv: object) -> str:
    return str(drv.find_element("id", "status").text)  # type: ignore[attr-defined]


def _done(drv: object) -> bool:
    return str(drv.find_element("id", "status").text).startswith("done")  # type: ignore[attr-defined]


def test_recording_from_the_microphone(stack: Stack, browser: object, jfk: Clip) -> None:
    drv = browser
    drv.get(stack.metrics_url + "/")  # type: ignore[attr-defined]
    drv.find_element("id", "record").click()  # type: ignore[attr-defined]
    # While recording it says so (it said "connected (model ...)" once the server was ready).
    _wait(drv, lambda d: _status(d).startswith("recording… (model "), 30, "recording")
    # The clip plays as the microphone once (11 s); its last words are final by about 13 s.
    _wait(drv, lambda d: len(_transcript(d).split()) >= 18, 60, "the clip's words")
    drv.find_element("id", "stop").click()  # type: ignore[attr-defined]
    _wait(drv, _done, 60, "done")
    text = _transcript(drv)
    # Looser than the upload's bound: on a loaded 2-core machine Chromium's fake capture drops
    # render quanta, and a dropped quantum is a pause the live chunker may cut at (once: "fellow
    # america" / "S NOT!", 3 of 22 words wrong). A page that lost the clip scores far above this.
    assert wer(jfk.reference, text) <= 0.25, text


def test_uploading_a_file(stack: Stack, browser: object, jfk: Clip) -> None:
    drv = browser
    drv.get(stack.metrics_url + "/")  # type: ignore[attr-defined]
    drv.find_element("id", "file").send_keys(str(jfk.path))  # type: ignore[attr-defined]
    _wait(drv, _done, 60, "done")
    text = _transcript(drv)
    assert wer(jfk.reference, text) <= 0.05, text


def test_the_server_s_refusal_stays_on_the_page_and_the_icon_is_served(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, browser: object, jfk: Clip
) -> None:
    # A keyed server, no key typed: its "an API key is required" was overwritten at once by
    # "closed: 4401 unauthorized".
    root = tmp_path_factory.mktemp("browser-keyed")
    keys_file = root / "api-keys"
    subprocess.run(
        [sys.executable, "-m", "katydid", "keys", "add", "alice", "--keys-file", str(keys_file)],
        check=True, capture_output=True,
    )  # fmt: skip
    with Stack(root, model_dir, workers=1, api_keys_file=str(keys_file)) as keyed:
        drv = browser
        drv.get(keyed.metrics_url + "/")  # type: ignore[attr-defined]
        drv.find_element("id", "file").send_keys(str(jfk.path))  # type: ignore[attr-defined]
        text = _wait(drv, lambda d: "(closed 4401)" in _status(d) and _status(d), 30, "the refusal")
        assert "API key" in text, text
        with urllib.request.urlopen(keyed.metrics_url + "/favicon.ico", timeout=10) as icon:
            assert icon.status == 200
            assert icon.headers["Content-Type"].startswith("image/")


# Resuming (docs/protocol.md, "Resuming a session"): the test closes the page's socket with 4000,
# a code that does not end the session (1000 would: the user gave up), so the gateway detaches
# the session and the page takes it back. Every status the page shows is logged, so that a
# "reconnecting…" shown for a moment is seen; with `cut_at_final`, the socket is closed from a
# MutationObserver as the first final is shown: the results already on their way are then lost
# (a closing socket delivers no more messages) and must come again, once, after the resume.
_WATCH = """
const cutAtFinal = arguments[0];
window.statuses = [];
new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes) window.statuses.push(n.textContent);
}).observe(document.getElementById("status"), { childList: true });
if (cutAtFinal) new MutationObserver((records, observer) => {
  if (document.getElementById("transcript").children.length === 0) return;
  observer.disconnect();
  socket.close(4000);
}).observe(document.getElementById("transcript"), { childList: true });
"""


def _seqs(drv: object) -> list[str]:
    script = 'return [...document.getElementById("transcript").children].map(p => p.dataset.seq)'
    return list(drv.execute_script(script))  # type: ignore[attr-defined]


def _statuses(drv: object) -> list[str]:
    return list(drv.execute_script("return window.statuses"))  # type: ignore[attr-defined]


def _check_resumed_once_each(drv: object, *, every_chunk_speaks: bool) -> None:
    """The page reconnected and resumed, showed each final once and in order, and ended done
    with as many finals as the server's chunks (none failed here). A chunk with no words (the
    microphone's silence after the clip) has no final: then at most as many."""
    statuses = _statuses(drv)
    assert "reconnecting…" in statuses, statuses
    assert "resumed" in statuses, statuses
    assert statuses.index("reconnecting…") < statuses.index("resumed"), statuses
    seqs = [int(s) for s in _seqs(drv)]
    assert seqs == sorted(set(seqs)), seqs
    done = re.fullmatch(r"done: [\d.]+ s of audio, (\d+) chunks", _status(drv))
    assert done, _status(drv)
    chunks = int(done[1])
    assert len(seqs) == chunks if every_chunk_speaks else len(seqs) <= chunks, (seqs, chunks)


@pytest.fixture(scope="module")
def mix(speech_dir: Path) -> Clip:
    """The shortest of the shared mixes (61 s): long enough to be cut into several jobs (a file
    of at most chunk_max_s, 30 s, is one), so the cut falls mid-transcript."""
    return min(read_manifest(speech_dir / "mixes.tsv"), key=lambda c: c.duration_s)


def test_an_upload_resumes_after_its_connection_is_lost(
    stack: Stack, browser: object, mix: Clip
) -> None:
    drv = browser
    drv.get(stack.metrics_url + "/")  # type: ignore[attr-defined]
    drv.execute_script(_WATCH, True)  # type: ignore[attr-defined]
    drv.find_element("id", "file").send_keys(str(mix.path))  # type: ignore[attr-defined]
    _wait(drv, _done, 90, "done")
    _check_resumed_once_each(drv, every_chunk_speaks=True)
    assert len(_seqs(drv)) > 2, _seqs(drv)  # the cut was mid-transcript
    text = _transcript(drv)
    assert wer(mix.reference, text) <= 0.10, text


def test_a_recording_resumes_after_its_connection_is_lost(
    stack: Stack, browser: object, jfk: Clip
) -> None:
    drv = browser
    drv.get(stack.metrics_url + "/")  # type: ignore[attr-defined]
    drv.execute_script(_WATCH, False)  # type: ignore[attr-defined]
    drv.find_element("id", "record").click()  # type: ignore[attr-defined]
    _wait(drv, lambda d: _status(d).startswith("recording… (model "), 30, "recording")
    # Mid-utterance ("ask not what your country..."): the server's jobs end before it, so the
    # page sends its kept PCM from resume_offset_bytes, then what it captured meanwhile.
    time.sleep(5)
    drv.execute_script("socket.close(4000)")  # type: ignore[attr-defined]
    _wait(drv, lambda d: "resumed" in _statuses(d), 30, "the resume")
    _wait(drv, lambda d: len(_transcript(d).split()) >= 18, 60, "the clip's words")
    drv.find_element("id", "stop").click()  # type: ignore[attr-defined]
    _wait(drv, _done, 60, "done")
    _check_resumed_once_each(drv, every_chunk_speaks=False)
    text = _transcript(drv)
    assert wer(jfk.reference, text) <= 0.25, text  # the bound of the undisturbed recording
