"""Inference-time intervention (Li et al. 2023): fit per-head shifts from probes
(:mod:`.steering`), apply them while the model runs, evaluate them (:mod:`.evaluation`) and export
them (:mod:`.export`).

>>> steering = ha.steer.fit(loaded, "truth", k=16)
>>> with ha.steer.applied(loaded, steering, alpha=15):
...     loaded.model.generate(...)
>>> result = ha.steer.truthfulqa(loaded, "TruthfulQA.csv", alphas=(0, 5, 15), ks=(16,))

:func:`truthfulqa` runs ITI on TruthfulQA (MC1 / MC2, cross-validated over questions; :mod:`.tqa`).
"""

from .evaluation import evaluate, generate, sweep_figure
from .export import BAKE_TARGETS, export_bake, export_lm_eval
from .steering import DIRECTIONS, HeadShift, Steering, applied, fit, load_steering
from .tqa import TruthfulQAResult, truthfulqa

__all__ = [
    "BAKE_TARGETS",
    "DIRECTIONS",
    "HeadShift",
    "Steering",
    "TruthfulQAResult",
    "applied",
    "evaluate",
    "export_bake",
    "export_lm_eval",
    "fit",
    "generate",
    "load_steering",
    "sweep_figure",
    "truthfulqa",
]
