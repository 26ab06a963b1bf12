"""Detectors: small pure functions from an attention view (and what the battery knows of its
tokens) to per-row scores, registered by name. No model, no mutation of inputs.

- :mod:`.attention`: self-attention detectors (:data:`DETECTORS`: positional, entropy, subword,
  distance, repeat) and the scores each writes (:data:`DETECTOR_SCORES`).
- :mod:`.cross`: cross-attention detectors of encoder–decoder models (:data:`CROSS_DETECTORS`:
  cross_positional, cross_entropy, alignment) and the alignment error rate.
- :mod:`.words`: token → word attention, the one pooling every word-level score uses.
"""

from .attention import DETECTOR_SCORES, DETECTORS, Context, Detector, Score
from .cross import CROSS_DETECTOR_SCORES, CROSS_DETECTORS, CrossContext

__all__ = [
    "CROSS_DETECTORS",
    "CROSS_DETECTOR_SCORES",
    "DETECTORS",
    "DETECTOR_SCORES",
    "Context",
    "CrossContext",
    "Detector",
    "Score",
]
