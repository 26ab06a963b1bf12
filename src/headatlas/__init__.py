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

_EXPORTS: dict[str, str | tuple[str, str | None]] = {
    "patch": ("headatlas.apps.patching", "patch_effects"),
    "kv": ("headatlas.apps.kv", None),  # the module itself
    "probe": ("headatlas.apps.headprobe", "probe"),
    "steer": ("headatlas.apps.steer", None),  # the module itself
    "Atlas": "headatlas.atlas",
    "Guard": "headatlas.apps.guard",
    "scan": "headatlas.scanning",
    "ScanConfig": "headatlas.scanning",
    "head_outputs": "headatlas.capture",
    "SCORES": "headatlas.scores",
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
    "SCORES",
    "Atlas",
    "Guard",
    "HeadStats",
    "HeadatlasError",
    "LoadedModel",
    "ModelInfo",
    "ScanConfig",
    "__version__",
    "ablate",
    "attention_maps",
    "head_outputs",
    "kv",
    "load",
    "patch",
    "probe",
    "scan",
    "steer",
]

if TYPE_CHECKING:
    from .apps import kv, steer
    from .apps.guard import Guard
    from .apps.headprobe import probe
    from .apps.patching import patch_effects as patch
    from .atlas import Atlas
    from .capture import ablate, attention_maps, head_outputs
    from .detectors import DETECTORS
    from .errors import HeadatlasError
    from .loading import LoadedModel, ModelInfo, load
    from .roles import RULES
    from .scanning import ScanConfig, scan
    from .scores import SCORES
    from .stats import HeadStats


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        where = _EXPORTS[name]
        module, attr = where if isinstance(where, tuple) else (where, name)
        found = importlib.import_module(module)
        value = found if attr is None else getattr(found, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'headatlas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
