"""JSON from outside: every way it can be wrong is one ValueError, NotJson."""

from __future__ import annotations

import pytest

from katydid import wire_json


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # RecursionError from json.loads itself
        '{"a": ' * 5000 + "1" + "}" * 5000,
        "NaN",
        '{"max_wait_s": Infinity}',
        "[-Infinity]",
        '{"max_wait_s": 1e400}',  # valid JSON, read as infinity
        "[-1.5e999]",
        "",
        b"\xff\xfe{",
    ],
)
def test_what_is_not_json_is_a_value_error(text: str | bytes) -> None:
    with pytest.raises(wire_json.NotJson):
        wire_json.loads(text)


def test_json_is_parsed() -> None:
    assert wire_json.loads(b'{"type": "start", "x": [[1.5]]}') == {"type": "start", "x": [[1.5]]}
