"""headatlas: map every attention head of a transformer language model.

``import headatlas`` is cheap: torch and transformers load on first use of an attribute.

>>> import headatlas as ha
>>> model = ha.load("default")
>>> atlas = ha.scan(model, probes=["natural", "repeat"])
>>> atlas.top("induction", 5)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .core.lazy import Export, lazy_getattr

logging.getLogger(__name__).addHandler(logging.NullHandler())  # silent unless the application logs

__version__ = "0.1.0"

_EXPORTS: dict[str, Export] = {
    "patch": ("headatlas.apps.patch.patching", "patch_effects"),
    "kv": ("headatlas.apps.kv", None),  # the package itself
    "probe": ("headatlas.apps.probe.probing", "probe"),
    "steer": ("headatlas.apps.steer", None),  # the package itself
    "Atlas": "headatlas.atlas.table",
    "Guard": "headatlas.apps.guard",
    "scan": "headatlas.scanning.scan",
    "ScanConfig": "headatlas.scanning.config",
    "head_outputs": "headatlas.capture",
    "SCORES": "headatlas.core.scores",
    "load": "headatlas.model.load",
    "LoadedModel": "headatlas.model.info",
    "ModelInfo": "headatlas.model.info",
    "ablate": "headatlas.capture",
    "attention_maps": "headatlas.capture",
    "HeadatlasError": "headatlas.core.errors",
    "HeadStats": "headatlas.atlas.stats",
    "DETECTORS": "headatlas.detectors",
    "RULES": "headatlas.core.roles",
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
    from .apps.patch.patching import patch_effects as patch
    from .apps.probe.probing import probe
    from .atlas.stats import HeadStats
    from .atlas.table import Atlas
    from .capture import ablate, attention_maps, head_outputs
    from .core.errors import HeadatlasError
    from .core.roles import RULES
    from .core.scores import SCORES
    from .detectors import DETECTORS
    from .model.info import LoadedModel, ModelInfo
    from .model.load import load
    from .scanning.config import ScanConfig
    from .scanning.scan import scan

__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return __all__
