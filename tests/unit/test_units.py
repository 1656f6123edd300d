"""The systemd units in infra/systemd: `systemd-analyze verify` clean and every unit's exposure
at most 3.0 ("OK"), as the operator would check them. Skipped, with the reason, where
systemd-analyze is absent."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "infra" / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed on this host"
)


def test_there_are_units() -> None:
    assert {p.name for p in SERVICES} >= {
        "katydid-gateway.service",
        "katydid-worker@.service",
        "katydid-model.service",
        "nats-server.service",
    }


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_exposure_is_ok(unit: Path) -> None:
    assert ANALYZE is not None
    run = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--threshold=30", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    overall = run.stdout.strip().splitlines()[-1:] or [run.stderr]
    assert run.returncode == 0, f"{unit.name}: {overall[0]}"


def test_units_verify_clean(tmp_path: Path) -> None:
    """The units as installed (their /opt/katydid/venv paths pointed at this environment's
    executables, which verify checks exist; the template as an instance)."""
    assert ANALYZE is not None
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "katydid").exists()
    names = []
    for unit in SERVICES:
        name = unit.name.replace("@.service", "@0.service")
        text = unit.read_text(encoding="utf-8").replace("/opt/katydid/venv/bin/", f"{bin_dir}/")
        (tmp_path / name).write_text(text, encoding="utf-8")
        names.append(str(tmp_path / name))
    run = subprocess.run(
        [ANALYZE, "verify", "--man=no", *names], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "", run.stderr  # unknown keys are only warnings: none allowed
