"""What a head is called, and which heads a model has: one spelling out, every spelling in.

A head is ``(layer, head)`` with 0-based indices. It is always *shown* as ``L3H1``; on input
``L3H1``, ``L3 H1``, ``L3.H1``, ``l3h1`` and ``3.1`` are all accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import SupportsInt

from .errors import HeadatlasError, param

Head = tuple[int, int]
"""``(layer, head)``, 0-based."""

_SPELLINGS = re.compile(r"^\s*L?\s*(\d+)\s*(?:\.|\s|\.?\s*H)\s*H?\s*(\d+)\s*$", re.IGNORECASE)


def head_name(layer: SupportsInt, head: SupportsInt) -> str:
    """Return the display name of a head: ``L3H1``."""
    return f"L{int(layer)}H{int(head)}"


def parse_head(text: str) -> Head:
    """Return the ``(layer, head)`` written as ``L3H1``, ``L3 H1``, ``L3.H1`` or ``3.1``.

    Raises :class:`HeadatlasError` for anything else (ranges are checked by :func:`check_heads`).
    """
    found = _SPELLINGS.match(text)
    if not found:
        raise HeadatlasError(f"cannot read head {text.strip()!r}: write heads as L3H1 (or 3.1)")
    return int(found.group(1)), int(found.group(2))


def parse_heads(
    spec: str, n_layers: int | None = None, n_heads: int | None = None, name: str = "heads"
) -> list[Head]:
    """Parse a comma-separated list of heads (any accepted spelling), duplicates dropped, in order.

    With ``n_layers`` and ``n_heads`` every head is checked to exist (:func:`check_heads`).
    ``name`` is the parameter the list came from, for the error when it is empty.
    """
    heads = list(dict.fromkeys(parse_head(part) for part in spec.split(",") if part.strip()))
    if not heads:
        raise HeadatlasError(f"{param(name)} is empty: give heads as L3H1,L17H4")
    if n_layers is not None and n_heads is not None:
        check_heads(heads, n_layers, n_heads)
    return heads


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_layer(layer: int, n_layers: int) -> None:
    """Raise :class:`HeadatlasError` unless ``layer`` is an integer in ``0 .. n_layers - 1``."""
    if not _is_int(layer):
        raise HeadatlasError(f"a layer is an integer, got {layer!r}")
    if not 0 <= layer < n_layers:
        raise HeadatlasError(f"no layer {layer}: out of range, layers are 0..{n_layers - 1}")


def check_heads(heads: Iterable[Head | str] | str, n_layers: int, n_heads: int) -> list[Head]:
    """Return ``heads`` as a list of ``(layer, head)`` after checking each is a head of an
    ``n_layers × n_heads`` model. A head may be a pair or any spelling :func:`parse_head` reads
    (``"L3H1"``); a string is a comma-separated list of them.

    The one validator of head indices: ablation, pruning, maps and the viewer all use it.
    """
    if isinstance(heads, str):
        heads = [h for h in heads.split(",") if h.strip()]
    try:
        items = list(heads)
    except TypeError:
        raise HeadatlasError(
            f"heads are a list of (layer, head) pairs or L3H1 names, got {heads!r}"
        ) from None
    out: list[Head] = []
    for item in items:
        if isinstance(item, str):
            item = parse_head(item)
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise HeadatlasError(f"a head is a pair (layer, head) or a name like L3H1, got {item!r}")
        layer, head = item
        if not (_is_int(layer) and _is_int(head)):
            raise HeadatlasError(f"a head is a pair of integers (layer, head), got ({layer!r}, {head!r})")
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise HeadatlasError(
                f"no head {head_name(layer, head)}: out of range, the model has {n_layers} layers × {n_heads} heads"
            )
        out.append((layer, head))
    return out


def heads_by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    """Group heads by layer: ``{layer: [head, ...]}`` in first-seen order."""
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(layer, []).append(head)
    return out


HEAD_SET_FORMAT = "headatlas head set"
"""The ``format`` of a head-set JSON file (``headatlas conflict --out``, ``headatlas safety --out``):
an object whose ``heads`` is a list of head names, which ``headatlas prune --heads FILE`` and
``ha.ablate(loaded, heads)`` apply."""


def read_head_set(path: str | Path, n_layers: int | None = None, n_heads: int | None = None) -> list[Head]:
    """Return the heads of a head-set JSON file (``{"format": "headatlas head set", "heads": [...]}``),
    checked to exist in an ``n_layers × n_heads`` model when both are given; raise
    :class:`HeadatlasError` naming the file when it cannot be read."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HeadatlasError(f"cannot read head set {str(file)!r}: {type(exc).__name__}") from None
    heads = data.get("heads") if isinstance(data, dict) else None
    if not isinstance(heads, list) or not heads or not all(isinstance(h, str) for h in heads):
        raise HeadatlasError(f"head set {str(file)!r} has no 'heads' list of names such as \"L3H1\"")
    parsed = list(dict.fromkeys(parse_head(h) for h in heads))
    if n_layers is not None and n_heads is not None:
        check_heads(parsed, n_layers, n_heads)
    return parsed
