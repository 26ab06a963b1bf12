"""The one rule from an atlas's per-head scores to per-KV-head scores.

A query head's score counts relative to the model's strongest head on that score (divided by the
largest absolute value; NaN and negative values count as 0); several scores combine by their
maximum; a KV head takes the maximum over the query heads that read it (RazorAttention, Tang et al.
2024: a KV head must keep every token if any of its query heads needs them). Every value is in
[0, 1]. ``kv plan`` ranks KV
heads by it, and ``export --format duo`` / ``kv export --format duo`` write it as DuoAttention gates,
so a plan keeps exactly the KV heads whose exported gate is above the plan's cut-off.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...atlas.table import Atlas
from ...core.errors import HeadatlasError, param
from ...core.scores import SCORES


def relative_scores(atlas: Atlas, names: Sequence[str], name: str = "by") -> np.ndarray:
    """Return ``[layer, head]`` in [0, 1]: each score in ``names`` divided by its largest absolute
    value over the model (NaN and negative values count as 0), combined by their maximum.

    Raises :class:`HeadatlasError` naming parameter ``name`` for a score the atlas does not have.
    """
    combined = np.zeros(atlas.shape)  # [layer, head]
    for score in names:
        if score not in atlas.score_columns:
            spec = SCORES.get(score)
            hint = f"scan with --probes {spec.battery} --add" if spec is not None else "pick a score it has"
            raise HeadatlasError(
                f"the atlas has no score {score!r} for {param(name)}: {hint} "
                f"(it has {', '.join(atlas.score_columns[:8]) or 'no scores'})"
            )
        values = np.nan_to_num(atlas.matrix(score), nan=0.0)  # [layer, head]
        top = float(np.abs(values).max()) or 1.0
        combined = np.maximum(combined, values / top)  # [layer, head]
    return combined


def kv_head_scores(atlas: Atlas, names: Sequence[str], name: str = "by") -> np.ndarray:
    """Return ``[layer, kv_head]`` scores in [0, 1]: the maximum of :func:`relative_scores` over each
    KV head's query heads (see the module docstring)."""
    values = relative_scores(atlas, names, name)  # [layer, head]
    n_layers, n_heads = values.shape
    group = atlas.model.group_size
    return values.reshape(n_layers, n_heads // group, group).max(-1)  # [layer, kv_head]
