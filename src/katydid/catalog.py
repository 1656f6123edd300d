"""Which models the service offers, and whether one can honour a session's options.

Pure code: the gateway builds ``ModelOffer``s from worker heartbeats and asks here at ``start``,
so a session that asks for something no worker can do is refused before anything is queued
(``unsupported_option``), instead of being transcribed as something else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from katydid.errors import ErrorCode, ProtocolError
from katydid.languages import AUTO, WHISPER_LANGUAGES

_WEIGHTS = re.compile(r"-(f16|q\d+_\d+)$")  # the weight-format suffix: tiny.en-q8_0 -> tiny.en


def family(name: str) -> str:
    """``"tiny.en-q8_0"`` -> ``"tiny.en"``: the model whatever its weight format."""
    return _WEIGHTS.sub("", name)


def served_name(model: str) -> str:
    """The name a model is served and routed under: the configured name, or for an explicit
    ggml file (``--model /models/ggml-base-q8_0.bin``) its stem without ``ggml-``."""
    if "/" not in model and not model.endswith(".bin"):
        return model
    stem = model.rstrip("/").rsplit("/", 1)[-1].removesuffix(".bin").removeprefix("ggml-")
    # Any file name must route: what a subject token cannot hold becomes "_".
    routable = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")[:64]
    return routable or "custom"


def english_only(name: str) -> bool:
    """Whisper's naming: ``*.en`` models know English only (tiny.en, base.en, ...)."""
    return family(name).endswith(".en")


@dataclass(frozen=True, slots=True)
class ModelOffer:
    name: str
    multilingual: bool
    workers: int = 0  # live workers serving it (0: none seen yet)

    @property
    def languages(self) -> tuple[str, ...]:
        return WHISPER_LANGUAGES if self.multilingual else ("en",)

    def describe(self) -> str:
        langs = f"{len(WHISPER_LANGUAGES)} languages" if self.multilingual else "en"
        return f"{self.name} ({langs})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "languages": list(self.languages), "workers": self.workers}


def offers_from(models: Iterable[tuple[str, bool | None]]) -> dict[str, ModelOffer]:
    """``(model, multilingual or None if unknown)`` per live worker -> one offer per model."""
    counts: dict[str, int] = {}
    multi: dict[str, bool] = {}
    for name, is_multi in models:
        counts[name] = counts.get(name, 0) + 1
        multi[name] = is_multi if is_multi is not None else not english_only(name)
    return {n: ModelOffer(n, multi[n], counts[n]) for n in sorted(counts)}


def _unsupported(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.UNSUPPORTED_OPTION, message)


def _menu(offers: Mapping[str, ModelOffer]) -> str:
    return ", ".join(o.describe() for o in offers.values()) or "no model (no worker is running)"


def choose_model(
    offers: Mapping[str, ModelOffer], requested: str | None, default: str
) -> ModelOffer:
    """The model a session gets.

    Without ``model`` in ``start`` it is the server's default, even while no worker of it is up
    (it may be restarting: the session is seated and waits). A model named by the client must
    have a live worker; a name without weight suffix (``tiny.en``) matches its served variant
    (``tiny.en-q8_0``).

    Raises:
        ProtocolError: ``unsupported_option``, naming what the server offers.
    """
    if requested is None:
        found = offers.get(default) or next(
            (o for o in offers.values() if family(o.name) == family(default)), None
        )
        return found or ModelOffer(default, not english_only(default))
    if requested in offers:
        return offers[requested]
    same = [o for o in offers.values() if family(o.name) == requested]
    if same:
        return max(same, key=lambda o: o.workers)
    raise _unsupported(f"no worker serves model {requested!r}; this server offers: {_menu(offers)}")


def check_options(
    offer: ModelOffer, offers: Mapping[str, ModelOffer], *, language: str, task: str
) -> None:
    """Refuse a language or task the chosen model cannot honour.

    Raises:
        ProtocolError: ``unsupported_option`` naming the option and what the server offers.
    """
    if language != AUTO and language not in WHISPER_LANGUAGES:
        raise _unsupported(
            f"unknown language {language!r}: use a Whisper language code (en, de, fr, ...) or"
            " 'auto'"
        )
    if offer.multilingual:
        return
    if language not in ("en", AUTO):
        raise _unsupported(
            f"language {language!r} needs a multilingual model; {offer.name} knows English only;"
            f" this server offers: {_menu(offers)}"
        )
    if task == "translate":
        raise _unsupported(
            f"task 'translate' needs a multilingual model; {offer.name} knows English only;"
            f" this server offers: {_menu(offers)}"
        )
