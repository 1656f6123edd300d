"""Who may do what on NATS: the roles of Katydid's processes and their permissions, rendered as
nats-server configuration (the embedded server's, and ``infra/nats/katydid-accounts.conf``, which
a test keeps equal to ``accounts_config()``).

Roles, in one account with JetStream (``KATYDID``):
- ``gateway``: publishes jobs and cancels, writes session records (``$KV.KATYDID_SESSIONS.>``,
  the KV bucket's puts and deletes) and the deployment's secret (``KATYDID_GATEWAYS``), tells
  and hears session takeovers, runs the JetStream API (stream and bucket setup, publish
  acks, deleting ended sessions' jobs, queue depth, reading records and stored results) but may
  not delete or purge the job stream or delete its consumers; hears every gateway's results
  (``katydid.results.>``: a resumed session's results come from the gateway that served it
  before), heartbeats, dead-job advisories.
- ``worker`` (the role; one user per worker or per worker host, ``worker`` by default): reads
  the stream's and consumers' info, pulls and acks jobs, reads one session's record at a time
  (a direct get of a key of ``KATYDID_SESSIONS``, before it spends engine time on a job),
  publishes results (``katydid.results.<gateway>.<session>.<its user>``) and heartbeats, hears
  cancels, and hears its replies on an inbox prefix of its own (``_INBOX_W.<user>``); nothing
  else: no jobs, no stream changes, no consumer created or updated (the gateway provisions
  them; a worker with a changed filter or ack wait stalled every session), no other inbox
  (subscribed to ``_INBOX.>``, a worker read other workers' deliveries: audio, prompts, tokens),
  no KV write and no other stream's messages (a get by sequence could read any record or
  stored result).
- ``admin``: everything in the account (``katydid nats setup|status``, the ``nats`` CLI).

Rule: passwords never appear in the rendered text; it names environment variables that
nats-server reads at start (``$KATYDID_NATS_<ROLE>_PASSWORD``), each value in double quotes
(``password_environment``).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from katydid.messages import (
    CANCEL_SUBJECT,
    RESULTS_PREFIX,
    STREAM,
    STREAM_SUBJECTS,
    WORKERS_SUBJECT,
)
from katydid.session_record import (
    GATEWAYS_BUCKET,
    GATEWAYS_SUBJECT,
    SESSIONS_BUCKET,
    gateway_ping_subject,
)

ACCOUNT = "KATYDID"
# Gateways' own (katydid.bus.nats_sessions): the deployment's secret, which workers may not
# read, and the word that a newer connection took a session over.
TAKEOVER_SUBJECT = "katydid.sessions.takeover"
ROLES = ("admin", "gateway", "worker")

PERMISSIONS: dict[str, dict[str, Any]] = {
    "gateway": {
        "publish": {
            "allow": [
                STREAM_SUBJECTS,
                CANCEL_SUBJECT,
                f"$KV.{SESSIONS_BUCKET}.>",
                f"$KV.{GATEWAYS_BUCKET}.>",
                TAKEOVER_SUBJECT,
                f"{GATEWAYS_SUBJECT}.*",  # its heartbeat
                "$JS.API.>",
            ],
            "deny": [
                f"$JS.API.STREAM.DELETE.{STREAM}",
                f"$JS.API.STREAM.PURGE.{STREAM}",
                f"$JS.API.CONSUMER.DELETE.{STREAM}.>",
            ],
        },
        "subscribe": {
            "allow": [
                f"{RESULTS_PREFIX}.>",
                f"{WORKERS_SUBJECT}.>",
                TAKEOVER_SUBJECT,
                gateway_ping_subject("*"),  # its own: whether it is there, asked by workers
                f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM}.>",
                "_INBOX.>",
            ]
        },
        # To answer a worker's ping on its inbox (only the reply subject of a request it got)
        "allow_responses": True,
    },
}
WORKER_INBOX = "_INBOX_W"  # workers' inboxes: _INBOX_W.<user>.<id>, each user its own
DEFAULT_WORKER_USERS = ("worker",)
# A worker's one KV call: the last entry of one key (one token: a session id) of the sessions
# bucket, by subject. Not the bare ``...DIRECT.GET.KV_KATYDID_SESSIONS`` (a get by sequence,
# any entry), not STREAM.MSG.GET (any stream's messages: jobs, results).
WORKER_RECORD_GET = f"$JS.API.DIRECT.GET.KV_{SESSIONS_BUCKET}.$KV.{SESSIONS_BUCKET}.*"


def worker_inbox_prefix(user: str) -> str:
    """The inbox prefix a worker connecting as ``user`` uses (nats-py's ``inbox_prefix``):
    JetStream's answers and the jobs it pulls come there, and only ``user`` may subscribe."""
    return f"{WORKER_INBOX}.{user}"


def worker_permissions(user: str) -> dict[str, Any]:
    """Only the calls a worker makes: read the stream's and consumers' info, pull and ack
    jobs, read a session's record, on its own inboxes. Not STREAM.UPDATE (a stream's subjects and transforms can turn any
    subject into a job subject), not CONSUMER.CREATE (it can also update a consumer: its filter,
    ack wait, max ack pending), not ``_INBOX.>``."""
    return {
        "publish": {
            "allow": [
                # Results (``<gateway>.<session>``) under its own name only: the gateway logs
                # who answered each job.
                f"{RESULTS_PREFIX}.*.*.{user}",
                f"{WORKERS_SUBJECT}.>",
                f"$JS.API.STREAM.INFO.{STREAM}",
                f"$JS.API.CONSUMER.INFO.{STREAM}.>",
                f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.>",
                f"$JS.ACK.{STREAM}.>",
                WORKER_RECORD_GET,
                gateway_ping_subject("*"),  # is the gateway of a job's session still there
            ],
        },
        "subscribe": {
            "allow": [
                CANCEL_SUBJECT,
                f"{worker_inbox_prefix(user)}.>",
                f"{GATEWAYS_SUBJECT}.*",  # which gateways are alive (their sessions' jobs first)
            ]
        },
    }


def is_worker_user(name: str) -> bool:
    """A worker user's name: one subject token (it is in its inbox prefix), not a role's."""
    return (
        bool(name)
        and len(name) <= 64
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in name)
        and name not in ("admin", "gateway")
    )


def password_variable(user: str) -> str:
    return f"KATYDID_NATS_{user.upper().replace('-', '_')}_PASSWORD"


def password_environment(passwords: dict[str, str]) -> dict[str, str]:
    """nats-server's environment for ``passwords`` (role -> password): each variable in double
    quotes. nats-server parses a variable's value as configuration, not as a string: unquoted,
    ``-68lx...`` is a parse error (it stops at start) and ``10kb`` becomes the number 10240 (no
    client's password matches); one random password in about 20 broke a start."""
    env = {}
    for role, pw in passwords.items():
        if '"' in pw or "\\" in pw or not pw.isprintable():
            raise ValueError(
                f"the {role} password must be printable, without quotes or backslashes"
            )
        env[password_variable(role)] = f'"{pw}"'
    return env


def accounts_config(workers: Sequence[str] = DEFAULT_WORKER_USERS) -> str:
    """The ``accounts`` block: one account; admin, gateway, and a user per name in ``workers``
    (one per worker host, say: each can be revoked alone, and none hears another's jobs), each
    with its permissions.

    Raises:
        ValueError: a worker user's name is not one subject token, or is a role's.
    """
    users = []
    for name in workers:
        if not is_worker_user(name):
            raise ValueError(
                f"worker user {name!r}: use letters, digits, '-' and '_' (not admin or gateway)"
            )
    if len({password_variable(n) for n in workers}) < len(workers):
        raise ValueError(f"worker users {list(workers)} repeat a name (or differ by - and _)")
    for name in ("admin", "gateway", *workers):
        user = f"      {{user: {name}, password: ${password_variable(name)}"
        permissions = PERMISSIONS.get(name) or (
            None if name == "admin" else worker_permissions(name)
        )
        if permissions is not None:
            user += f",\n       permissions: {json.dumps(permissions)}"
        users.append(user + "}")
    return (
        "# Katydid's NATS account and roles (generated by katydid.bus.accounts; keep equal).\n"
        "# Passwords come from the environment of nats-server: KATYDID_NATS_<ROLE>_PASSWORD.\n"
        "accounts {\n"
        f"  {ACCOUNT} {{\n"
        "    jetstream: enabled\n"
        "    users: [\n" + ",\n".join(users) + "\n    ]\n"
        "  }\n"
        "}\n"
    )


def embedded_credentials(path: Path, workers: Sequence[str] = ()) -> dict[str, str]:
    """The embedded server's passwords, one per role and one per worker user in ``workers``:
    read from ``path``, the missing ones made; written there (0600) when anything was made."""
    wanted = (*ROLES, *workers)
    stored: dict[str, str] = {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            stored = {k: v for k, v in data.items() if isinstance(v, str)}
    except (OSError, ValueError):
        pass
    if all(u in stored for u in wanted):
        return {u: stored[u] for u in wanted}
    made = stored | {u: secrets.token_urlsafe(24) for u in wanted if u not in stored}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(made, f)
    os.replace(tmp, path)
    return {u: made[u] for u in wanted}
