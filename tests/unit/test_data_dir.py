"""One `katydid serve` per data directory (katydid/data_dir.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from katydid.data_dir import DataDirInUse, claimed


def test_a_held_directory_is_refused_in_words_and_free_again_once_released(tmp_path: Path) -> None:
    store = tmp_path / "data"
    refused = rf"\(pid {os.getpid()}\) is using .*--data-dir"
    # flock is per open file: a second claim conflicts even from this process.
    with claimed(store), pytest.raises(DataDirInUse, match=refused), claimed(store):
        pass
    with claimed(store):  # released with the first, as when its process ends
        assert (store / "serve.lock").read_text().strip() == str(os.getpid())
