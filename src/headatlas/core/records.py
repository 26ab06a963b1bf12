"""Files headatlas writes and reads back (KV plans, steering, guards): their fields as a small
schema, checked on load so that a damaged or hand-edited file is a one-line error naming the file
and the field, never a ``TypeError`` or ``IndexError`` later.

A schema maps each field to a :data:`Check`: a function returning ``None`` for a good value and
what is wrong otherwise. :func:`check_record` applies one (missing and unknown fields are errors
too, except the optional ones).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from .errors import HeadatlasError

Check = Callable[[Any], str | None]
"""A field check: ``None`` when the value is good, else a few words on what is wrong."""


def is_int(low: int | None = None) -> Check:
    """An integer (at least ``low``)."""

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return f"must be an integer, got {value!r}"
        return None if low is None or int(value) >= low else f"must be at least {low}, got {value}"

    return check


def is_number(value: Any) -> str | None:
    """A finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        return f"must be a finite number, got {value!r}"
    return None


def is_text(value: Any) -> str | None:
    """A string."""
    return None if isinstance(value, str) else f"must be a string, got {type(value).__name__}"


def is_bool(value: Any) -> str | None:
    """``true`` or ``false``."""
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def is_dict(value: Any) -> str | None:
    """A JSON object."""
    return None if isinstance(value, dict) else f"must be an object, got {type(value).__name__}"


def list_of(item: Check) -> Check:
    """A list whose every item passes ``item``."""

    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return f"must be a list, got {type(value).__name__}"
        for index, entry in enumerate(value):
            problem = item(entry)
            if problem is not None:
                return f"item {index} {problem}"
        return None

    return check


def optional(inner: Check) -> Check:
    """``null`` or what ``inner`` accepts."""
    return lambda value: None if value is None else inner(value)


def one_of(*choices: Any) -> Check:
    """One of ``choices``."""
    return lambda value: None if value in choices else f"must be one of {', '.join(map(str, choices))}"


def check_record(
    data: Any,
    fields: Mapping[str, Check],
    where: str,
    what: str,
    optional_fields: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Return ``data`` after checking it is a JSON object with exactly ``fields`` (those in
    ``optional_fields`` may be missing), each passing its check. Raise :class:`HeadatlasError`
    naming ``where`` (the file), ``what`` it should be and the first bad field."""
    if not isinstance(data, dict):
        raise HeadatlasError(f"{where} is not a {what}: it holds no JSON object")
    missing = [name for name in fields if name not in data and name not in optional_fields]
    if missing:
        raise HeadatlasError(f"{where} is not a complete {what}: no {missing[0]!r} field")
    unknown = [name for name in data if name not in fields]
    if unknown:
        raise HeadatlasError(f"{where} is not a {what} headatlas wrote: unknown field {unknown[0]!r}")
    for name, check in fields.items():
        if name in data:
            problem = check(data[name])
            if problem is not None:
                raise HeadatlasError(f"{where}: field {name!r} {problem}")
    return data
