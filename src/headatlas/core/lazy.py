"""Names a package exports without importing them: the one lazy ``__getattr__`` headatlas uses.

``import headatlas`` and ``import headatlas.report`` stay cheap (no torch, no matplotlib) because
their public names are imported on first use by the function :func:`lazy_getattr` returns.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

Export = str | tuple[str, str | None]
"""Where a lazy name lives: a module (the attribute has the same name), or ``(module, attribute)``
(``None``: the module itself)."""


def lazy_getattr(
    package: str, exports: Mapping[str, Export], namespace: dict[str, Any]
) -> Callable[[str], Any]:
    """Return a module-level ``__getattr__`` for ``package`` that imports ``exports`` on first use.

    The value found is stored in ``namespace`` (the package's ``globals()``), so each name is
    imported once; an unknown name raises :class:`AttributeError` as Python expects.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = exports[name]
        module, attr = where if isinstance(where, tuple) else (where, name)
        found = importlib.import_module(module)
        value = found if attr is None else getattr(found, attr)
        namespace[name] = value
        return value

    return __getattr__
