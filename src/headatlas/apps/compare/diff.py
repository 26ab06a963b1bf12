"""Two atlases side by side: per score, Spearman over heads and overlap of the top k; per role,
the heads gained and lost; one figure.

Works for two scans of one model (other data, seeds, a pruned or steered checkpoint) and for two
models of the same shape (layers × heads); heads are matched by ``(layer, head)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...atlas.table import Atlas
from ...core.errors import HeadatlasError, check_at_least
from ...core.heads import head_name
from ...core.outputs import Folder, check_output_dir
from ...core.roles import RULES
from ...core.storage import atomic_path, write_json
from ...report.figures import save_figure

SCORES_FILE = "compare_scores.csv"
ROLES_FILE = "compare_roles.csv"
JSON_FILE = "compare.json"
FIGURE_FILE = "compare.png"
COMPARE_FOLDER = Folder("compare", JSON_FILE)
"""The comparison folder: ``compare`` writes its tables, ``compare.json`` and the figure there."""
SCORE_COLUMNS = ("score", "spearman", "top_k_overlap", "k", "heads", "mean_a", "mean_b", "top_a", "top_b")
ROLE_COLUMNS = ("role", "a", "b", "kept", "gained", "lost", "gained_heads", "lost_heads")


@dataclass
class Comparison:
    """What :func:`compare_atlases` returns: one row per score and per role, and where A and B came
    from."""

    scores: pd.DataFrame
    """Columns :data:`SCORE_COLUMNS`: Spearman over heads, |top-k(A) ∩ top-k(B)| / k, means and
    the top heads of each side."""
    roles: pd.DataFrame
    """Columns :data:`ROLE_COLUMNS`: heads holding the role in A, in B, in both, only in B (gained)
    and only in A (lost)."""
    meta: dict[str, Any] = field(default_factory=dict)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Return Spearman's rank correlation of two vectors [n] over the entries finite in both (ties
    get average ranks); NaN with fewer than 3 such entries or a constant side."""
    keep = np.isfinite(a) & np.isfinite(b)  # [n]
    if keep.sum() < 3:
        return float("nan")
    ra = pd.Series(a[keep]).rank().to_numpy()  # [kept]
    rb = pd.Series(b[keep]).rank().to_numpy()  # [kept]
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _role_sets(atlas: Atlas) -> dict[str, set[str]]:
    sets: dict[str, set[str]] = {}
    table = atlas.table
    for layer, head, roles in zip(
        table["layer"].tolist(), table["head"].tolist(), table["roles"].tolist(), strict=True
    ):
        for role in str(roles or "").split(","):
            if role:
                sets.setdefault(role, set()).add(head_name(int(layer), int(head)))
    return sets


def _check_shapes(a: Atlas, b: Atlas) -> None:
    if a.shape != b.shape:
        raise HeadatlasError(
            f"compare needs two atlases of the same shape: A has {a.shape[0]} × {a.shape[1]} heads, "
            f"B {b.shape[0]} × {b.shape[1]}"
        )


def compare_atlases(a: Atlas, b: Atlas, scores: Sequence[str] | None = None, k: int = 10) -> Comparison:
    """Return the :class:`Comparison` of atlases ``a`` and ``b`` (same layers × heads).

    ``scores``: the columns to compare (default: every score column both have). Spearman is over
    all heads; the overlap is of the ``k`` highest heads of each side.
    """
    _check_shapes(a, b)
    check_at_least("k", k, 1)
    common = [c for c in a.score_columns if c in set(b.score_columns)]
    if scores is None:
        names = common
        if not names:
            raise HeadatlasError("the two atlases share no score: nothing to compare")
    else:
        names = list(scores)
        for name in names:
            a.check_score(name)
            b.check_score(name)
    k = min(k, len(a.table))
    key = ["layer", "head"]
    left, right = a.table.set_index(key).sort_index(), b.table.set_index(key).sort_index()
    rows = []
    for name in names:
        va = left[name].to_numpy(dtype=float)  # [heads]
        vb = right[name].reindex(left.index).to_numpy(dtype=float)  # [heads]
        top_a = [head_name(*h) for h in left[name].nlargest(k).index]
        top_b = [head_name(*h) for h in right[name].nlargest(k).index]
        overlap = len(set(top_a) & set(top_b)) / k
        rows.append(
            (name, spearman(va, vb), overlap, k, len(va), np.nanmean(va), np.nanmean(vb), top_a, top_b)
        )
    roles_a, roles_b = _role_sets(a), _role_sets(b)
    order = [r.role for r in RULES] + sorted((set(roles_a) | set(roles_b)) - {r.role for r in RULES})
    role_rows = []
    for role in order:
        ha_, hb = roles_a.get(role, set()), roles_b.get(role, set())
        if not ha_ and not hb:
            continue
        gained, lost = sorted(hb - ha_), sorted(ha_ - hb)
        role_rows.append((role, len(ha_), len(hb), len(ha_ & hb), len(gained), len(lost), gained, lost))
    model_a, model_b = a.model, b.model
    if model_a.sha256 and model_b.sha256:
        same_model = model_a.sha256 == model_b.sha256
    else:  # a model passed in as an object has no weights file to hash: go by its name
        same_model = model_a.name == model_b.name
    meta = {
        "a": model_a.name,
        "b": model_b.name,
        "same_model": bool(same_model),
        "shape": list(a.shape),
        "k": k,
    }
    return Comparison(
        pd.DataFrame(rows, columns=SCORE_COLUMNS), pd.DataFrame(role_rows, columns=ROLE_COLUMNS), meta
    )


def comparison_figure(result: Comparison, out: str | Path) -> Path:
    """Write the comparison's figure: per score, Spearman and top-k overlap as bars; per role, heads
    in A and B with the kept share. Returns the path."""
    scores, roles = result.scores, result.roles
    height = 1.2 + 0.22 * max(len(scores), len(roles), 1)
    fig = Figure(figsize=(9.0, height))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    y = np.arange(len(scores))  # [scores]
    left.barh(y - 0.2, scores["spearman"].fillna(0.0), height=0.4, color="#3b6ea5", label="Spearman")
    left.barh(
        y + 0.2,
        scores["top_k_overlap"],
        height=0.4,
        color="#e08b2c",
        label=f"top-{result.meta.get('k')} overlap",
    )
    left.set_yticks(y, scores["score"], fontsize=7)
    left.set_xlim(-1.0, 1.0)
    left.axvline(0.0, color="#999999", linewidth=0.6)
    left.invert_yaxis()
    left.legend(fontsize=7, loc="lower left")
    left.set_title("scores: A vs B", fontsize=9)
    yr = np.arange(len(roles))  # [roles]
    right.barh(yr - 0.2, roles["a"], height=0.4, color="#8c8c8c", label="A")
    right.barh(yr + 0.2, roles["b"], height=0.4, color="#2e8b57", label="B")
    right.barh(
        yr + 0.2, roles["kept"], height=0.4, color="none", edgecolor="black", hatch="//", label="in both"
    )
    right.set_yticks(yr, roles["role"], fontsize=7)
    right.invert_yaxis()
    right.legend(fontsize=7, loc="lower right")
    right.set_title("heads per role", fontsize=9)
    fig.suptitle(f"A: {result.meta.get('a')}  ·  B: {result.meta.get('b')}", fontsize=9)
    fig.subplots_adjust(left=0.16, right=0.98, wspace=0.45, top=1 - 0.55 / height, bottom=0.4 / height)
    return save_figure(fig, out)


def write_comparison(result: Comparison, out: str | Path, figure: bool = True) -> list[Path]:
    """Write ``compare_scores.csv``, ``compare_roles.csv``, ``compare.json`` (both tables and the
    meta) and, with ``figure``, ``compare.png`` into ``out``; return the paths."""
    directory = Path(out)
    check_output_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for frame, name in ((result.scores, SCORES_FILE), (result.roles, ROLES_FILE)):
        flat = frame.copy()
        for column in flat.columns:
            if flat[column].map(lambda v: isinstance(v, list)).any():
                flat[column] = flat[column].map(" ".join)
        with atomic_path(directory / name) as tmp:
            flat.to_csv(tmp, index=False)
        paths.append(directory / name)
    payload = {
        **result.meta,
        "scores": json.loads(result.scores.to_json(orient="records")),
        "roles": json.loads(result.roles.to_json(orient="records")),
    }
    write_json(directory / JSON_FILE, payload, indent=2)
    paths.append(directory / JSON_FILE)
    if figure:
        paths.append(comparison_figure(result, directory / FIGURE_FILE))
    return paths
