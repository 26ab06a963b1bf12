"""headatlas: map every attention head of a transformer language model.

``import headatlas`` is cheap: torch and transformers load on first use of an attribute.

>>> import headatlas as ha
>>> model = ha.load("default")
>>> atlas = ha.scan(model, probes=["natural", "repeat"])
>>> atlas.top("induction", 5)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Atlas": "headatlas.atlas",
    "scan": "headatlas.atlas",
    "load": "headatlas.loading",
    "LoadedModel": "headatlas.loading",
    "ModelInfo": "headatlas.loading",
    "ablate": "headatlas.capture",
    "attention_maps": "headatlas.capture",
    "HeadatlasError": "headatlas.errors",
    "HeadStats": "headatlas.stats",
    "DETECTORS": "headatlas.detectors",
    "RULES": "headatlas.roles",
}

__all__ = [
    "DETECTORS",
    "RULES",
    "Atlas",
    "HeadStats",
    "HeadatlasError",
    "LoadedModel",
    "ModelInfo",
    "__version__",
    "ablate",
    "attention_maps",
    "load",
    "scan",
]

if TYPE_CHECKING:
    from .atlas import Atlas, scan
    from .capture import ablate, attention_maps
    from .detectors import DETECTORS
    from .errors import HeadatlasError
    from .loading import LoadedModel, ModelInfo, load
    from .roles import RULES
    from .stats import HeadStats


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'headatlas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
