"""JSON that arrives from outside (clients, and anything that can publish on NATS): parse errors
of every kind are one ``ValueError``.

``json.loads`` raises ``RecursionError`` for arrays or objects nested past the interpreter's
recursion limit: a 2 KB line of ``[`` took a handler's ``except ValueError`` by surprise, and
its error reached the door's nursery and ended the whole server. It also accepts ``NaN`` and
``Infinity``, which are not JSON (RFC 8259) and would pass a ``float`` check as a bound.
"""

from __future__ import annotations

import json
import math
from typing import Any


class NotJson(ValueError):
    """Not JSON, for any reason."""


def loads(text: str | bytes | bytearray) -> Any:
    """Parse ``text`` as strict JSON.

    Raises:
        NotJson: not JSON, a ``NaN``/``Infinity`` constant, a number too large for a float, or
            nested too deeply.
    """
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError:
        raise NotJson("JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a refused constant
        raise NotJson(str(exc)) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    # 1e400 is valid JSON, and Python reads it as infinity: the Infinity refused above.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value
