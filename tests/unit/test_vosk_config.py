"""The vosk door's config message: a sample rate is a whole number of Hz."""

from __future__ import annotations

from typing import Any

import pytest

from katydid.errors import ProtocolError
from katydid.gateway.vosk import _sample_rate


@pytest.mark.parametrize("config", [{}, {"sample_rate": 16_000}, {"sample_rate": 16_000.0}])
def test_whole_rates_are_rates(config: dict[str, Any]) -> None:
    assert _sample_rate(config) == config.get("sample_rate", 16_000)


@pytest.mark.parametrize("rate", [16_000.5, 1e300, "16000", True, None])
def test_anything_else_is_told_what_a_rate_is(rate: Any) -> None:
    with pytest.raises(ProtocolError, match="whole number of Hz") as caught:
        _sample_rate({"sample_rate": rate})
    assert len(str(caught.value)) < 100  # nothing 300 digits long echoed
