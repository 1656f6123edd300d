"""What the server offers and what a model can honour: refused at start, named in words."""

from __future__ import annotations

import json

import pytest

from katydid.catalog import (
    ModelOffer,
    check_options,
    choose_model,
    english_only,
    offers_from,
    served_name,
)
from katydid.errors import ErrorCode, ProtocolError
from katydid.gateway.events import Final, Ready
from katydid.gateway.native_wire import receive_text
from katydid.gateway.options import Limits, StartOptions
from katydid.gateway.outputs import JobStamp, Publish, Send
from katydid.gateway.session import Session
from katydid.languages import WHISPER_LANGUAGES
from katydid.messages import Job, JobOptions, JobResult, ResultSegment, ResultWord

OFFERS = offers_from(
    [("tiny.en-q8_0", False), ("tiny.en-q8_0", False), ("base", True), ("small", None)]
)


def _refused(fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    assert info.value.code is ErrorCode.UNSUPPORTED_OPTION
    assert info.value.close_code == 1003
    return info.value.message


def test_offers_count_workers_and_know_languages() -> None:
    assert OFFERS["tiny.en-q8_0"] == ModelOffer("tiny.en-q8_0", False, 2)
    assert OFFERS["base"].languages == WHISPER_LANGUAGES
    assert OFFERS["small"].multilingual  # no flag in its heartbeat: Whisper's naming decides
    assert english_only("base.en-q4_0")
    assert not english_only("base-q8_0")
    assert OFFERS["tiny.en-q8_0"].to_dict()["languages"] == ["en"]


def test_choose_model_exact_family_default_and_unknown() -> None:
    assert choose_model(OFFERS, "base", "tiny.en-q8_0").name == "base"
    assert choose_model(OFFERS, "tiny.en", "tiny.en-q8_0").name == "tiny.en-q8_0"
    assert choose_model(OFFERS, None, "tiny.en-q8_0").name == "tiny.en-q8_0"
    # The default model is never refused, even with no worker up (seated, it waits).
    assert choose_model({}, None, "tiny.en-q8_0") == ModelOffer("tiny.en-q8_0", False)
    message = _refused(choose_model, OFFERS, "large", "tiny.en-q8_0")
    assert message.startswith("no worker serves model 'large'; this server offers: ")
    assert "tiny.en-q8_0 (en)" in message
    assert "base (99 languages)" in message
    assert "no worker is running" in _refused(choose_model, {}, "base", "tiny.en-q8_0")


def test_check_options() -> None:
    tiny, base = OFFERS["tiny.en-q8_0"], OFFERS["base"]
    check_options(tiny, OFFERS, language="en", task="transcribe")
    check_options(tiny, OFFERS, language="auto", task="transcribe")
    check_options(base, OFFERS, language="de", task="translate")
    check_options(base, OFFERS, language="auto", task="transcribe")
    message = _refused(check_options, tiny, OFFERS, language="de", task="transcribe")
    assert message.startswith("language 'de' needs a multilingual model; tiny.en-q8_0 knows")
    assert "base (99 languages)" in message
    assert "translate" in _refused(check_options, tiny, OFFERS, language="en", task="translate")
    for bad in ("xx", "yue", "english"):
        assert "unknown language" in _refused(
            check_options, base, OFFERS, language=bad, task="transcribe"
        )


@pytest.mark.parametrize(
    ("start", "code"),
    [
        ({"task": "summarise"}, ErrorCode.BAD_MESSAGE),
        ({"task": 1}, ErrorCode.BAD_MESSAGE),
        ({"model": 3}, ErrorCode.BAD_MESSAGE),
        ({"model": ""}, ErrorCode.BAD_MESSAGE),
        ({"prompt": "é" * 513}, ErrorCode.TOO_LARGE),  # 1,026 bytes: the bound counts bytes
        ({"prompt": "\ud800"}, ErrorCode.BAD_MESSAGE),  # a lone surrogate: not text
    ],
)
def test_start_option_types_and_bounds(start: dict[str, object], code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        StartOptions.from_message({"type": "start", **start}, Limits.default(max_prompt_bytes=1024))
    assert info.value.code is code


@pytest.mark.parametrize(("given", "used"), [("EN", "en"), ("en-US", "en"), ("pt_BR", "pt")])
def test_language_tags_are_read_as_whisper_codes(given: str, used: str) -> None:
    opts = StartOptions.from_message({"type": "start", "language": given}, Limits.default())
    assert opts.language == used


def test_prompt_at_its_byte_bound_fits_a_small_header() -> None:
    start = {"type": "start", "prompt": "é" * 512, "task": "translate"}
    opts = StartOptions.from_message(start, Limits.default(max_prompt_bytes=1024))
    assert opts.task == "translate"
    options = JobOptions(prompt=opts.prompt, task="translate")
    header = Job("s-0", "s", 0, 0, "r", 1, options).headers()["Katydid-Options"]
    assert len(header.encode()) < 4 * 1024  # escaped: 6 bytes per character at most
    assert Job.from_headers(Job("s-0", "s", 0, 0, "r", 1, options).headers()).options == options


def test_words_and_language_travel_to_the_client() -> None:
    seg = ResultSegment(
        1.0, 2.0, "Hello there.", (ResultWord("Hello", 1.0, 1.4), ResultWord("there.", 1.4, 2.0))
    )
    result = JobResult("s1-0", "s1", 0, "final", "Hello there.", (seg,), "de", 1.0, 0.1, 0.0, "w0")
    assert JobResult.from_json(result.to_json()) == result
    session = Session("s1", Limits.default(), JobStamp("r", lambda _: "t", lambda: 0.0), now=0.0)
    receive_text(session, '{"type": "start"}', 0.0)
    session.admitted("base", ())
    session.receive_bytes(b"\x10\x00" * 16_000, 0.0)
    jobs = [o for o in receive_text(session, '{"type": "stop"}', 0.0) if isinstance(o, Publish)]
    assert [p.job.seq for p in jobs] == [0]
    sent = session.receive_result(result)
    final = sent[0].event if isinstance(sent[0], Send) else None
    assert isinstance(final, Final)
    event = json.loads(final.to_json())
    assert event["language"] == "de"
    assert event["segments"][0]["words"] == [
        {"word": "Hello", "start_s": 1.0, "end_s": 1.4},
        {"word": "there.", "start_s": 1.4, "end_s": 2.0},
    ]
    ready = json.loads(Ready("s1", "base", (OFFERS["base"].to_dict(),)).to_json())
    assert ready["model"] == "base"
    assert ready["models"][0]["languages"][:2] == ["en", "zh"]


def test_language_table_matches_whisper_cpp() -> None:
    pw = pytest.importorskip("_pywhispercpp")
    ours = [pw.whisper_lang_str(i) for i in range(len(WHISPER_LANGUAGES))]
    assert tuple(ours) == WHISPER_LANGUAGES


@pytest.mark.parametrize(
    ("configured", "served"),
    [
        ("tiny.en-q8_0", "tiny.en-q8_0"),
        ("/models/ggml-base-q8_0.bin", "base-q8_0"),
        ("/models/my model (v2).bin", "my_model__v2_"),
        ("/models/ggml-.bin", "custom"),
    ],
)
def test_a_model_file_is_served_under_a_routable_name(configured: str, served: str) -> None:
    from katydid.messages import is_model_name

    assert served_name(configured) == served
    assert is_model_name(served)
