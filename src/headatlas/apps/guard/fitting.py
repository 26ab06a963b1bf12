"""Fitting the guard's detectors from labelled features: pure functions on arrays.

- Important heads (Hung et al. 2024, Attention Tracker): keep head h when
  (mean_benign − mean_attack) − n·(std_benign + std_attack) > 0 over its focus values.
- Threshold: calibrated on benign rows only, τ = mean − k·std of their focus score (the benign
  Φ(−k) quantile where that would be ≤ 0 and flag nothing).
- Logistic regression (standardised features, L2 penalty; the one fitter of
  :mod:`headatlas.apps.common.logreg`): on all heads'
  focus values (the learned head variant), and on the last token's residual stream at one layer
  (PIShield, Zou et al. 2025), the layer chosen by a two-fold split of the training rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...core.errors import HeadatlasError, param
from ..common.logreg import fit_logreg
from .metrics import auroc


def select_heads(focus: np.ndarray, labels: np.ndarray, n_sigma: float) -> list[tuple[int, int]]:
    """Return the ``(layer, head)`` pairs passing Attention Tracker's rule on ``focus [row, layer, head]``."""
    y = np.asarray(labels).astype(bool)  # [row]
    benign, attack = focus[~y], focus[y]  # [n_b, layer, head], [n_a, layer, head]
    margin = (benign.mean(0) - attack.mean(0)) - n_sigma * (benign.std(0) + attack.std(0))  # [layer, head]
    return [(int(layer), int(head)) for layer, head in zip(*np.nonzero(margin > 0), strict=True)]


def calibrate(benign_focus: np.ndarray, k_sigma: float) -> float:
    """Return τ = mean − k·std of the benign rows' focus scores ``[row]`` (Attention Tracker's
    rule, Hung et al. 2024); flag a focus below τ.

    A focus is an attention share, never negative, so a τ ≤ 0 would flag nothing (a spread-out,
    skewed benign focus: SmolLM2-135M's). Then τ is the benign quantile that k standard deviations
    cut under a normal distribution (k = 2: the 2.3 % quantile), which keeps the rule's intended
    false-positive rate on the benign rows.
    """
    focus = np.asarray(benign_focus, dtype=np.float64)  # [row]
    tau = float(focus.mean() - k_sigma * focus.std())
    if tau > 0:
        return tau
    share = 0.5 * math.erfc(k_sigma / math.sqrt(2.0))  # Φ(−k)
    return float(np.quantile(focus, share))


@dataclass(frozen=True)
class Logistic:
    """A fitted logistic regression on standardised features: p = σ(w·(x − μ)/σ + b)."""

    weight: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return P(injected) for ``x [row, feature]``, ``[row]``."""
        z = ((x - self.mean) / self.scale) @ self.weight + self.bias  # [row]
        return np.asarray(0.5 * (1.0 + np.tanh(z / 2.0)))  # σ(z), without exp's overflow

    def to_dict(self) -> dict[str, object]:
        """Return the JSON form (lists of floats)."""
        return {
            "weight": self.weight.tolist(),
            "bias": self.bias,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Logistic:
        """Return the regression stored by :meth:`to_dict`."""
        return cls(
            np.asarray(data["weight"], dtype=np.float64),
            float(data["bias"]),  # type: ignore[arg-type]
            np.asarray(data["mean"], dtype=np.float64),
            np.asarray(data["scale"], dtype=np.float64),
        )


def fit_logistic(x: np.ndarray, labels: np.ndarray, l2: float = 1.0) -> Logistic:
    """Return a :class:`Logistic` fitted on ``x [row, feature]``: mean log-loss + ``l2 · |w|² / (2n)``.

    Fitted by the one logistic regression (:func:`~headatlas.apps.common.logreg.fit_logreg`, float64)
    as a two-class problem: its optimum has ``W₁ = −W₀ = w / 2``, so its penalty
    ``(λ / 2)(|W₀|² + |W₁|²)`` is this one with ``λ = 2 · l2 / n``.
    """
    y_np = np.asarray(labels).astype(int)
    if y_np.min() == y_np.max():
        raise HeadatlasError("training rows need both labels (benign 0 and injected 1)")
    mean = x.mean(0)
    scale = x.std(0) + 1e-6
    xs = torch.tensor((x - mean) / scale, dtype=torch.float64)[None]  # [1, row, feature]
    fit = fit_logreg(xs, torch.tensor(y_np), 2, l2=2.0 * l2 / len(y_np), max_iter=200)
    weight = (fit.weight[0, :, 1] - fit.weight[0, :, 0]).numpy().copy()  # [feature]
    return Logistic(weight, float(fit.bias[0, 1] - fit.bias[0, 0]), mean, scale)


def choose_layer(residual: np.ndarray, labels: np.ndarray, seed: int = 0) -> int:
    """Return the residual layer whose probe separates best on a two-fold split of ``residual [row, layer, d]``."""
    y = np.asarray(labels).astype(int)
    rng = np.random.default_rng(seed)
    folds = rng.permutation(len(y)) % 2  # [row]
    if any(len(set(y[folds == f])) < 2 for f in (0, 1)):
        raise HeadatlasError(f"too few training rows to choose a probe layer ({param('rows')})")
    best, best_auc = 1, -1.0
    for layer in range(1, residual.shape[1]):  # layer 0 is the embedding of the last token alone
        scores = np.zeros(len(y))
        for f in (0, 1):
            probe = fit_logistic(residual[folds != f, layer], y[folds != f])
            scores[folds == f] = probe.predict(residual[folds == f, layer])
        auc = auroc(scores, y)
        if auc > best_auc:
            best, best_auc = layer, auc
    return best
