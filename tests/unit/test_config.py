"""Config: defaults, TOML, environment, overrides, validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from katydid.config import Config
from katydid.errors import ConfigError


def test_precedence_file_env_override(tmp_path: Path) -> None:
    toml = tmp_path / "k.toml"
    toml.write_text('model = "base"\nengine_threads = 2\nlanguage = "de"\n', encoding="utf-8")
    cfg = Config.load(
        toml,
        environ={"KATYDID_ENGINE_THREADS": "3", "KATYDID_WORD_TIMESTAMPS": "yes"},
        overrides={"language": "fr", "model": None},
    )
    assert (cfg.model, cfg.engine_threads, cfg.language, cfg.word_timestamps) == (
        "base",
        3,
        "fr",
        True,
    )


def test_config_path_from_environment(tmp_path: Path) -> None:
    toml = tmp_path / "k.toml"
    toml.write_text(f'model_dir = "{tmp_path}"\n', encoding="utf-8")
    assert Config.load(environ={"KATYDID_CONFIG": str(toml)}).model_dir == tmp_path


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"KATYDID_ENGINE_THREADS": "many"}, "engine_threads"),
        ({"KATYDID_ENGINE_THREADS": "0"}, "engine_threads must be"),
        ({"KATYDID_WORD_TIMESTAMPS": "maybe"}, "word_timestamps"),
        ({"KATYDID_LOG_FORMAT": "xml"}, "log_format"),
        ({"KATYDID_LOG_LEVEL": "chatty"}, "log_level must be"),
        # The socket layer would take 99999 as 34463 without a word.
        ({"KATYDID_PORT": "99999"}, "port must be 0..65535"),
        ({"KATYDID_PORT": "-5"}, "port must be 0..65535"),
        ({"KATYDID_WYOMING_PORT": "65536"}, "wyoming_port must be -1..65535"),
        ({"KATYDID_HTTP_PORT": "-2"}, "http_port must be -1..65535"),
        ({"KATYDID_WORKERS": "-2"}, "workers must be >= 0"),
        ({"KATYDID_DEFAULT_MAX_WAIT_S": "-1"}, "default_max_wait_s must be >= 0"),
    ],
)
def test_invalid_values_are_config_errors(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(environ=environ)


def test_unknown_keys_and_bad_files(tmp_path: Path) -> None:
    toml = tmp_path / "k.toml"
    toml.write_text("no_such_setting = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no_such_setting"):
        Config.load(toml, environ={})
    toml.write_text("model = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read"):
        Config.load(toml, environ={})
    with pytest.raises(ConfigError, match="engine_threads"):
        Config.load(environ={}, overrides={"engine_threads": True})


def test_configuration_page_lists_every_field_with_its_default() -> None:
    # docs/configuration.md's table is what operators read; it must not drift from the code.
    page = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", page.read_text(encoding="utf-8"), re.M)
    table = {name: default for name, default in rows if name in Config.__dataclass_fields__}
    assert set(table) == set(Config.__dataclass_fields__)
    defaults = Config()
    for name, text in table.items():
        if text.startswith("user "):  # platform directories, named in words
            continue
        # The table shows each default as Python source (e.g. `4 * 3600.0`); evaluate it.
        value = eval(text, {"__builtins__": {}})
        assert value == getattr(defaults, name), name
