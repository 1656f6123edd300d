"""How gateways and workers authenticate to NATS (``credentials``), and the embedded server's
own passwords (made once, 0600, read again on the next start)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from katydid.bus.accounts import (
    ROLES,
    accounts_config,
    embedded_credentials,
    password_environment,
)
from katydid.bus.nats_connection import credentials
from katydid.config import Config
from katydid.errors import ConfigError


def test_credentials_by_kind(tmp_path: Path) -> None:
    assert credentials(Config()) == {}
    assert credentials(Config(nats_user="worker", nats_password="pw")) == {
        "user": "worker",
        "password": "pw",
    }
    creds = tmp_path / "w.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    assert credentials(Config(nats_creds_file=str(creds))) == {"user_credentials": str(creds)}
    with pytest.raises(ConfigError, match="nats_nkey_seed_file: no such file"):
        credentials(Config(nats_nkey_seed_file=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match="nats_tls_ca_file"):
        credentials(Config(nats_tls_ca_file=str(tmp_path / "none.pem")))
    assert "pw" not in repr(Config(nats_password="pw"))


def test_a_tls_ca_becomes_a_verifying_context(tmp_path: Path) -> None:
    import trustme

    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    context = credentials(Config(nats_tls_ca_file=str(ca)))["tls"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED


def test_embedded_passwords_are_made_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "nats" / "credentials.json"
    first = embedded_credentials(path)
    assert set(first) == set(ROLES)
    assert len(set(first.values())) == len(ROLES)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert embedded_credentials(path) == first
    path.write_text("not json")
    assert embedded_credentials(path) != first  # unreadable: made anew


def test_the_rendered_accounts_hold_no_password() -> None:
    text = accounts_config()
    for role in ROLES:
        assert f"user: {role}, password: $KATYDID_NATS_{role.upper()}_PASSWORD" in text


def test_nats_server_reads_each_password_as_a_string() -> None:
    # Unquoted, nats-server parses "-68lx" as a number and stops, and "10kb" as 10240.
    env = password_environment({"admin": "-68lx", "gateway": "10kb", "worker": "Ab_9"})
    assert env == {
        "KATYDID_NATS_ADMIN_PASSWORD": '"-68lx"',
        "KATYDID_NATS_GATEWAY_PASSWORD": '"10kb"',
        "KATYDID_NATS_WORKER_PASSWORD": '"Ab_9"',
    }
    for bad in ('a"b', "a\\b", "a\nb"):
        with pytest.raises(ValueError, match="without quotes"):
            password_environment({"admin": bad})


def test_each_worker_user_has_its_own_password_inbox_and_no_consumer_rights(
    tmp_path: Path,
) -> None:
    path = tmp_path / "nats" / "credentials.json"
    first = embedded_credentials(path)
    more = embedded_credentials(path, ["worker0", "worker1"])
    assert {k: more[k] for k in ROLES} == first  # kept: a running server's users go on
    assert len(set(more.values())) == len(ROLES) + 2
    assert embedded_credentials(path, ["worker0", "worker1"]) == more
    text = accounts_config(["worker0", "worker-b"])
    assert "user: worker0, password: $KATYDID_NATS_WORKER0_PASSWORD" in text
    assert "user: worker-b, password: $KATYDID_NATS_WORKER_B_PASSWORD" in text
    assert '"_INBOX_W.worker0.>"' in text
    assert '"_INBOX_W.worker-b.>"' in text
    assert "CONSUMER.CREATE" not in text.split("user: worker0", 1)[1]
    assert '"_INBOX.>"' not in text.split("user: worker0", 1)[1]
    for bad in ("a.b", "a b", "", "gateway", "x>"):
        with pytest.raises(ValueError, match="worker user"):
            accounts_config([bad])
