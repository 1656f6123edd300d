"""Fixtures of every integration test module."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="module")
def _collect_what_the_module_left() -> Iterator[None]:
    """A socket or file a module's test left open is reported in that module's teardown
    (``filterwarnings = error`` makes it a failure), not in whichever later test the garbage
    collector happened to run in: under ``pytest -n`` that test is any module's."""
    yield
    gc.collect()
