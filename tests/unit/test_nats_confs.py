"""The nats-server configurations in infra/ load (`nats-server -t`), as an operator would start
them: each beside the accounts file, with the environment its header names."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from katydid.embedded_nats import nats_server_binary

INFRA = Path(__file__).resolve().parents[2] / "infra"
ACCOUNTS = INFRA / "systemd" / "katydid-accounts.conf"
PASSWORDS = {
    f"KATYDID_NATS_{role}_PASSWORD": '"a-password"' for role in ("ADMIN", "GATEWAY", "WORKER")
}


@pytest.mark.parametrize(
    ("conf", "env"),
    [
        (INFRA / "systemd" / "nats-server.conf", {}),
        (INFRA / "nats" / "cluster-node.conf", {"NODE_NAME": "node1", "NODE_ADDR": "10.0.0.1"}),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else "",
)
def test_conf_loads(tmp_path: Path, conf: Path, env: dict[str, str]) -> None:
    shutil.copy(conf, tmp_path / conf.name)
    shutil.copy(ACCOUNTS, tmp_path / ACCOUNTS.name)
    run = subprocess.run(
        [nats_server_binary(), "-c", conf.name, "-t"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", **PASSWORDS, **env},
        timeout=30,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "is valid" in run.stdout + run.stderr
