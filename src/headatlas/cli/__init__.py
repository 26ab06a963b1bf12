"""The ``headatlas`` command line: one module per command family, sharing :mod:`.common`.

- :mod:`.atlas`: ``scan``, ``show``, ``map``
- :mod:`.view`: ``report``, ``serve``
- :mod:`.prune`: ``importance``, ``redundancy``, ``prune``, ``prune-curve``
- :mod:`.verify`: ``verify``
- :mod:`.patch`: ``patch``
- :mod:`.circuit`: ``circuit`` (faithfulness curves, ``circuit compare``, IOI path patching)
- :mod:`.probe`: ``probe``
- :mod:`.steer`: ``steer fit``, ``steer eval``, ``steer generate``, ``steer export``
- :mod:`.zoo`: ``zoo``
- :mod:`.interop`: ``compare``, ``export``, ``import``
- :mod:`.kv`: ``kv plan``, ``kv eval``, ``kv export``
- :mod:`.guard`: ``guard fit``, ``guard score``, ``guard eval``
- :mod:`.retain`: ``retain``
- :mod:`.data`: ``data status``, ``data install``
- :mod:`.conformance`: ``doctor``, ``conformance``
- :mod:`.conflict`: ``conflict``
- :mod:`.safety`: ``safety``

Commands only parse, call the library and print; the work lives in the library. Torch and
transformers are imported lazily, so ``headatlas --help`` is instant.
"""

from __future__ import annotations

import sys

from . import (
    atlas,
    circuit,
    conflict,
    conformance,
    data,
    guard,
    interop,
    kv,
    patch,
    probe,
    prune,
    retain,
    safety,
    steer,
    verify,
    view,
    zoo,
)
from .common import app, err_console

__all__ = ["app", "main"]
_COMMANDS = (
    prune,
    verify,
    atlas,
    conformance,
    data,
    guard,
    interop,
    kv,
    patch,
    circuit,
    probe,
    retain,
    steer,
    view,
    zoo,
    conflict,
    safety,
)  # imported for their @app.command registrations


def main() -> None:
    """Entry point of the ``headatlas`` script."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
