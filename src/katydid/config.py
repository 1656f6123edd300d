"""Katydid's configuration: one immutable, typed object.

Sources, later ones winning: defaults here → a TOML file (``--config`` or ``KATYDID_CONFIG``) →
``KATYDID_<FIELD>`` environment variables → explicit overrides (command-line flags). Every bound
has a default and a name with its unit. The object is passed down explicitly; there is no global.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from katydid.errors import ConfigError

ENV_PREFIX = "KATYDID_"


def _default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("katydid"))


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("katydid"))


@dataclass(frozen=True, slots=True)
class Config:
    """All of Katydid's settings. Field names carry their units."""

    # Model and engine
    model: str = "tiny.en"
    model_dir: Path = field(default_factory=_default_cache_dir)
    language: str = "en"
    engine_threads: int = 1
    beam_size: int = 0  # 0 = greedy decoding
    word_timestamps: bool = False
    # Audio input
    max_audio_s: float = 4 * 3600.0
    max_file_bytes: int = 512 * 1024 * 1024
    # Processes
    data_dir: Path = field(default_factory=_default_data_dir)
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.engine_threads < 1:
            raise ConfigError("engine_threads must be >= 1")
        if self.beam_size < 0:
            raise ConfigError("beam_size must be >= 0 (0 = greedy)")
        if self.max_audio_s <= 0 or self.max_file_bytes <= 0:
            raise ConfigError("max_audio_s and max_file_bytes must be positive")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("log_format must be auto, json or console")

    @classmethod
    def load(
        cls,
        path: Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Config:
        """Build the configuration from a TOML file, the environment and overrides.

        Args:
            path: TOML file; defaults to ``$KATYDID_CONFIG`` if set.
            environ: environment to read (default ``os.environ``).
            overrides: values that win over everything (e.g. command-line flags); ``None``
                values are ignored.

        Raises:
            ConfigError: an unknown key or a value of the wrong type.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = path or (
            Path(env[f"{ENV_PREFIX}CONFIG"]) if env.get(f"{ENV_PREFIX}CONFIG") else None
        )
        if path is not None:
            try:
                values.update(tomllib.loads(path.read_text(encoding="utf-8")))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        unknown = set(values) - set(fields)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**{k: _coerce(k, fields[k].type, v) for k, v in values.items()})


def _coerce(name: str, type_name: Any, value: Any) -> Any:
    # Field types are strings under `from __future__ import annotations`.
    kind = str(type_name)
    try:
        if kind == "Path":
            return Path(value).expanduser()
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config {name}: {value!r} is not a valid {kind}") from exc
    raise ConfigError(f"config {name}: unsupported type {kind}")  # pragma: no cover
