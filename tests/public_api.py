"""The public API as text: every name in ``headatlas.__all__`` with its signature (and, for a class,
its public methods and properties; for a package such as ``ha.kv``, every name in its ``__all__``).

``tests/test_public_api.py`` compares it with ``tests/fixtures/public_api.txt``. After a deliberate
change of the API, regenerate the file on purpose: ``python tests/public_api.py --write``.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

GOLDEN = Path(__file__).parent / "fixtures" / "public_api.txt"
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _signature(value: Any) -> str:
    try:
        text = str(inspect.signature(value))
    except (TypeError, ValueError):
        return "(...)"
    return _ADDRESS.sub("", text)


def _class(name: str, cls: type, indent: str) -> list[str]:
    lines = [f"{indent}class {name}{_signature(cls)}"]
    for attr, member in sorted(vars(cls).items()):
        if attr.startswith("_"):
            continue
        if isinstance(member, property):
            lines.append(f"{indent}    .{attr}: property")
        elif isinstance(member, (classmethod, staticmethod)):
            lines.append(f"{indent}    .{attr}{_signature(getattr(cls, attr))}  [{type(member).__name__}]")
        elif inspect.isfunction(member):
            lines.append(f"{indent}    .{attr}{_signature(member)}")
    return lines


def _entry(name: str, value: Any, indent: str = "") -> list[str]:
    if isinstance(value, ModuleType):
        lines = [f"{indent}module {name}"]
        for inner in sorted(getattr(value, "__all__", [])):
            lines += _entry(inner, getattr(value, inner), indent + "    ")
        return lines
    if inspect.isclass(value):
        return _class(name, value, indent)
    if callable(value):
        return [f"{indent}def {name}{_signature(value)}"]
    return [f"{indent}{name}: {type(value).__name__}"]


def public_api() -> str:
    """Return the snapshot text of ``headatlas``'s public API."""
    import headatlas

    lines: list[str] = []
    for name in sorted(headatlas.__all__):
        lines += _entry(name, getattr(headatlas, name))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = public_api()
    if sys.argv[1:] == ["--write"]:
        GOLDEN.write_text(text)
        print(f"wrote {GOLDEN} ({len(text.splitlines())} lines)")
    else:
        sys.stdout.write(text)
