"""Errors shown to users, and the validators every stage shares.

A :class:`HeadatlasError` message may name parameters with :func:`param` markers. Raised from the
library, ``str(error)`` shows the Python name (``seq_len``); the command line shows the flag the
user typed (``--seq-len``) with :meth:`HeadatlasError.render`. So one message serves both, and
the library never talks about flags a Python user does not have.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Collection
from typing import Any

_MARK = "\x00"
_PARAM = re.compile(r"\x00([A-Za-z_][A-Za-z0-9_]*)(?:\|([^\x00]*))?\x00")


def param(name: str, python: str | None = None) -> str:
    """Return a marker for parameter ``name`` to put in a :class:`HeadatlasError` message.

    ``str(error)`` shows ``python`` (default: the name itself, e.g. ``force=True`` for a switch);
    the command line shows the flag.
    """
    return f"{_MARK}{name}{'|' + python if python else ''}{_MARK}"


RESCAN = "rescan"
"""A pseudo-parameter: "make this atlas again", ``scan(..., force=True)`` in Python and the full
command on the command line (messages from commands without ``--force`` of their own use it)."""
_CLI_TEXT = {RESCAN: "`headatlas scan MODEL --out DIR --force`", "models": "MODELS"}
"""How the command line writes the parameters that are not flags (commands, positional arguments)."""


def flag(name: str) -> str:
    """Return the command-line flag of Python parameter ``name``: ``seq_len`` → ``--seq-len``."""
    return _CLI_TEXT.get(name) or "--" + name.replace("_", "-")


class HeadatlasError(Exception):
    """A user-facing error whose one-line message says what to do.

    Parameters named with :func:`param` read as Python names in ``str(error)`` and as flags in
    :meth:`render` (the command line's view).
    """

    def __init__(self, message: str) -> None:
        self.template = message
        super().__init__(_PARAM.sub(lambda m: m.group(2) or m.group(1), message))

    @property
    def params(self) -> list[str]:
        """The parameters the message names, in order."""
        return [m.group(1) for m in _PARAM.finditer(self.template)]

    def render(self, name_of: Callable[[str], str] = flag) -> str:
        """Return the message with every named parameter written as ``name_of(name)``."""
        return _PARAM.sub(lambda m: name_of(m.group(1)), self.template)


def check_number(name: str, value: Any, integer: bool = False) -> None:
    """Raise :class:`HeadatlasError` naming parameter ``name`` unless ``value`` is a finite number
    (an integer with ``integer``); ``True``/``False`` and strings are not numbers."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(float(value)):
        what = "an integer" if integer else "a finite number"
        raise HeadatlasError(f"{param(name)} must be {what}, got {value!r}")


def check_at_least(name: str, value: Any, low: int | float) -> None:
    """Raise :class:`HeadatlasError` naming parameter ``name`` unless ``value`` is a finite number
    ``>= low``, and an integer when ``low`` is one (pass ``0.0`` for a real-valued parameter)."""
    check_number(name, value, integer=isinstance(low, int))
    if not value >= low:
        raise HeadatlasError(f"{param(name)} must be at least {low}, got {value}")


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    """Raise :class:`HeadatlasError` naming parameter ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise HeadatlasError(
            f"unknown {param(name)} {value!r}: use one of {', '.join(str(c) for c in choices)}"
        )
