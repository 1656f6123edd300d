"""Every subcommand's long options parse on this Python: none is taken for an abbreviation of a
top-level option (`katydid load --mode short` once failed with "ambiguous option: --mode could
match --model, --model-dir")."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from katydid.cli_parser import build_parser


def _subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subcommands(sub, (*path, name))


def _cases() -> Iterator[tuple[str, ...]]:
    for path, sub in _subcommands(build_parser()):
        for action in sub._actions:
            for option in action.option_strings:
                if not option.startswith("--") or option == "--help":
                    continue
                if action.nargs == 0:
                    value: tuple[str, ...] = ()
                elif action.choices:
                    value = (str(next(iter(action.choices))),)
                else:
                    value = ("1",)
                yield (*path, option, *value)


CASES = list(_cases())


def test_the_cases_cover_the_commands_that_once_failed() -> None:
    assert ("load", "--mode", "short") in CASES
    assert len({c[0] for c in CASES}) >= 6


@pytest.mark.parametrize("argv", CASES, ids=" ".join)
def test_each_subcommand_option_parses(
    argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    # --help after the option: parsing gets past it (an ambiguity is exit 2), then help exits 0.
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*argv, "--help"])
    assert info.value.code == 0, capsys.readouterr().err


def test_an_error_raised_in_a_nursery_is_said_in_words(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from katydid import cli, cli_servers, native_stderr
    from katydid.cli import main
    from katydid.errors import KatydidError

    def nats_gone(*_: object) -> int:
        inner = BaseExceptionGroup("", [KatydidError("nats-server exited with code 0")])
        raise BaseExceptionGroup("", [inner])

    # (Logging and stderr are left as they are: configured here, logging would print to this
    # test's captured stderr for the tests after it, and the capture of native stderr would
    # rewire this process's file descriptor 2.)
    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    monkeypatch.setattr(native_stderr, "capture", lambda **_: None)
    monkeypatch.setattr(cli_servers, "run_server_command", nats_gone)
    assert main(["serve"]) == 1
    assert capsys.readouterr().err == "katydid: error: nats-server exited with code 0\n"

    def bug(*_: object) -> int:
        raise BaseExceptionGroup("", [KatydidError("x"), ValueError("a bug")])

    monkeypatch.setattr(cli_servers, "run_server_command", bug)
    with pytest.raises(BaseExceptionGroup):
        main(["serve"])


def test_a_reader_that_goes_away_is_not_a_traceback() -> None:
    # `katydid nats status | head -2`: a BrokenPipeError traceback, sometimes.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from katydid import cli, cli_model\n"
        "def gone(cfg, args):\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "cli_model.cmd_model = gone\n"
        "sys.exit(cli.main(['model', 'list']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (out.returncode, out.stderr) == (141, "")


@pytest.mark.parametrize("door", ["WebSocket door", "HTTP door"])
def test_a_port_in_use_is_said_with_its_address(
    door: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Was a 67-line ExceptionGroup traceback (gateway) or 117 lines (serve), the cause buried.
    import errno
    import socket

    import trio

    from katydid import cli, cli_servers, native_stderr
    from katydid.cli import main
    from katydid.errors import listening

    async def bind_busy(port: int) -> None:
        with listening(door, "127.0.0.1", port):
            if door == "WebSocket door":
                await trio.open_tcp_listeners(port, host="127.0.0.1")
            else:  # hypercorn binds inside a nursery: the error comes in a group
                async with trio.open_nursery():
                    raise OSError(errno.EADDRINUSE, "Address already in use")

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
        monkeypatch.setattr(native_stderr, "capture", lambda **_: None)
        monkeypatch.setattr(cli_servers, "run_server_command", lambda *_: trio.run(bind_busy, port))
        assert main(["gateway"]) == 1
    assert capsys.readouterr().err == (
        f"katydid: error: the {door} cannot listen on 127.0.0.1:{port}: address already in use\n"
    )


def test_an_os_error_is_said_in_words(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from katydid import cli, cli_model
    from katydid.cli import main

    def data_dir_is_a_file(*_: object) -> int:
        raise FileExistsError(17, "File exists", "/srv/katydid")

    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    monkeypatch.setattr(cli_model, "cmd_model", data_dir_is_a_file)
    assert main(["model", "list"]) == 1
    assert capsys.readouterr().err == "katydid: error: [Errno 17] File exists: '/srv/katydid'\n"


def test_serve_gives_its_workers_its_settings() -> None:
    # `katydid --config f serve`: the workers logged JSON at nice 10 with 1 thread, whatever
    # the file said (they read only the environment); they now get serve's resolved settings.
    import sys

    from katydid.config import Config
    from katydid.worker_processes import worker_argv

    cfg = Config(engine_threads=2, log_format="console", log_level="WARNING", nats_url="nats://x")
    argv = worker_argv(cfg, 3, "base-q8_0")
    assert argv[:3] == [sys.executable, "-m", "katydid"]
    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.model, args.engine_threads) == ("worker", "base-q8_0", 2)
    assert (args.log_format, args.log_level, args.nats_url) == ("console", "warning", "nats://x")


def test_serve_points_its_workers_at_its_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from katydid import cli, cli_servers, native_stderr
    from katydid.cli import main

    conf = tmp_path / "k.toml"
    conf.write_text("worker_nice = 5\n", encoding="utf-8")
    monkeypatch.delenv("KATYDID_CONFIG", raising=False)  # restored after the test
    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    monkeypatch.setattr(native_stderr, "capture", lambda **_: None)
    seen: list[str | None] = []
    monkeypatch.setattr(
        cli_servers, "run_server_command", lambda *_: seen.append(os.environ.get("KATYDID_CONFIG"))
    )
    main(["--config", str(conf), "serve"])
    assert seen == [str(conf.resolve())]


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_servers_take_the_keys_file_by_the_name_katydid_keys_uses(command: str) -> None:
    # `katydid serve --keys-file F` was refused ("unrecognized arguments") while `katydid keys`
    # and the README called it that.
    for flag in ("--keys-file", "--api-keys-file"):
        assert build_parser().parse_args([command, flag, "keys.txt"]).api_keys_file == "keys.txt"


def test_nats_commands_find_serve_s_nats_and_admin_credentials(tmp_path: Path) -> None:
    from katydid.cli_servers import embedded_admin
    from katydid.config import Config

    nats_dir = tmp_path / "nats"
    nats_dir.mkdir()
    (nats_dir / "nats-server.conf").write_text("listen: 127.0.0.1:4333\nhttp: 127.0.0.1:8333\n")
    (nats_dir / "credentials.json").write_text('{"admin": "pw-a", "gateway": "pw-g"}')
    found = embedded_admin(Config(data_dir=tmp_path))
    assert (found.nats_url, found.nats_user, found.nats_password) == (
        "nats://127.0.0.1:4333",
        "admin",
        "pw-a",
    )
    # What the operator set wins.
    given = Config(data_dir=tmp_path, nats_url="nats://n1:4222", nats_user="ops")
    assert embedded_admin(given) == given
    assert embedded_admin(Config(data_dir=tmp_path / "none")).nats_url == ""


def test_a_nats_url_taken_from_serve_s_data_dir_is_named_when_it_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from katydid import cli
    from katydid.cli import main
    from katydid.ports import free_port

    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)

    nats_dir = tmp_path / "nats"
    nats_dir.mkdir()
    # A serve that has stopped: its config names a port nobody listens on.
    (nats_dir / "nats-server.conf").write_text(f"listen: 127.0.0.1:{free_port()}\n")
    assert main(["nats", "status", "--data-dir", str(tmp_path)]) == 1
    said = capsys.readouterr().err
    assert str(nats_dir / "nats-server.conf") in said
    assert "--data-dir" in said
    assert "--nats-url" in said
