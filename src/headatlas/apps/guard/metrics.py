"""Detection metrics as pure functions of scores (higher = more likely injected) and 0/1 labels.

AUROC is the Mann–Whitney statistic (ties count one half), AUPRC the average precision
(scikit-learn's definition), and FPR at 95 % TPR the share of benign rows at or above the
highest threshold that still catches 95 % of the injected ones.
"""

from __future__ import annotations

import numpy as np

from ...core.errors import HeadatlasError


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()  # [n]
    y = np.asarray(labels).astype(int).ravel()  # [n]
    if s.shape != y.shape or not set(np.unique(y)) <= {0, 1}:
        raise HeadatlasError("labels must be 0/1, one per score")
    if y.min(initial=1) == y.max(initial=0):
        raise HeadatlasError("metrics need both benign (0) and injected (1) rows")
    return s, y


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Return the area under the ROC curve of ``scores [n]`` for ``labels [n]`` (Mann–Whitney U / n₊n₋)."""
    s, y = _check(scores, labels)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Return the average precision Σ (Rₖ − Rₖ₋₁) Pₖ over distinct thresholds of ``scores``."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct threshold
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(scores: np.ndarray, labels: np.ndarray, tpr: float = 0.95) -> float:
    """Return the false-positive rate at the highest threshold whose true-positive rate is ≥ ``tpr``."""
    s, y = _check(scores, labels)
    positives = np.sort(s[y == 1])[::-1]
    threshold = positives[int(np.ceil(tpr * len(positives))) - 1]
    return float(np.mean(s[y == 0] >= threshold))


def summary(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Return ``{"auroc", "auprc", "fpr_at_95_tpr"}`` of ``scores`` for ``labels``."""
    return {
        "auroc": auroc(scores, labels),
        "auprc": auprc(scores, labels),
        "fpr_at_95_tpr": fpr_at_tpr(scores, labels),
    }


def best_single_head(focus: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    """Return ``{"head": [layer, head], "auroc"}``: the head whose 1 − s best separates ``labels``.

    ``focus [row, layer, head]`` holds Attention Tracker's per-head s (Hung et al. 2024). The head
    is chosen on these very rows, so its AUROC bounds what any one-head selection could reach on
    them (a diagnostic of the model and data, never a detector's result).
    """
    _check(focus[:, 0, 0], labels)
    scores = np.array(
        [
            [auroc(1.0 - focus[:, layer, head], labels) for head in range(focus.shape[2])]
            for layer in range(focus.shape[1])
        ]
    )  # [layer, head]
    layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return {"head": [int(layer), int(head)], "auroc": float(scores[layer, head])}
