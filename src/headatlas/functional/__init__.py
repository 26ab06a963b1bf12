"""Functional batteries: which job a head does, each score defined by a paper.

| battery     | scores                                  | paper |
|-------------|-----------------------------------------|-------|
| ``needle``    | ``retrieval`` (+ ``retrieval_tf``)        | Wu et al. 2024, retrieval heads |
| ``ordinal``   | ``successor``, ``successor_logit``        | Gould et al. 2023, successor heads |
| ``copy``      | ``copying``                               | Elhage et al. 2021; McDougall et al. 2023 |
| ``translate`` | ``translation``                           | word-list translation heads |
| ``syntax``    | ``syntactic`` (+ side table)              | Clark et al. 2019 |
| ``dormant``   | ``dormancy``, ``sink_value_norm``, ``sink_output_norm``, ``sink_read`` (+ side table) | Guo et al. 2024, active–dormant heads |
| ``semantic``  | ``semantic_dependency``, ``semantic_capital``, ``semantic_antonym`` (+ side table) | Ren et al. 2024, semantic induction heads |
| ``negative``  | ``negative_attention`` (NAS)              | Yu et al. 2024, negative-bias heads |

Each lives in its own module and exposes ``SPEC`` (a :class:`~.base.BatterySpec`); the registry
below names the module, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib

from ..core.errors import HeadatlasError
from ..core.progress import Progress, no_progress
from .base import BatterySpec, FunctionalConfig, FunctionalResult

FUNCTIONAL_BATTERIES: dict[str, str] = {
    "needle": "headatlas.functional.needle",
    "ordinal": "headatlas.functional.ordinal",
    "copy": "headatlas.functional.copying",
    "translate": "headatlas.functional.translate",
    "syntax": "headatlas.functional.syntax",
    "dormant": "headatlas.functional.dormant",
    "semantic": "headatlas.functional.semantic",
    "negative": "headatlas.functional.negative",
}
"""Every functional battery by name → the module holding its ``SPEC``."""


def battery_spec(name: str) -> BatterySpec:
    """Return the :class:`BatterySpec` of functional battery ``name``; raise on an unknown name."""
    if name not in FUNCTIONAL_BATTERIES:
        raise HeadatlasError(
            f"unknown functional battery {name!r}: choose from {', '.join(FUNCTIONAL_BATTERIES)}"
        )
    spec: BatterySpec = importlib.import_module(FUNCTIONAL_BATTERIES[name]).SPEC
    return spec


__all__ = [
    "FUNCTIONAL_BATTERIES",
    "BatterySpec",
    "FunctionalConfig",
    "FunctionalResult",
    "Progress",
    "battery_spec",
    "no_progress",
]
