"""Models: loading (:mod:`.load`, the only ``from_pretrained``), what a loaded model is
(:mod:`.info`), packaged models (:mod:`.packaged`) and their one-time conversion (:mod:`.convert`,
:mod:`.ct2`), which weights a model holds (:mod:`.identity`), what each architecture needs
(:mod:`.archs`, as data) and removing heads from the weights (:mod:`.surgery`).

Importing this package does not import torch; :func:`load` does.
"""

from .info import LoadedModel, ModelInfo
from .load import DEFAULT_MODEL, load, reload_spec

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelInfo", "load", "reload_spec"]
