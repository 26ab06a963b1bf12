"""Many multinomial logistic regressions trained together: one per attention head, one tensor problem.

Head induction analysis trains a linear classifier on each head's output to see what the head
represents (Hewitt & Liang 2019, "Designing and Interpreting Probes with Control Tasks"; Li et al.
2023, "Inference-Time Intervention", who fit one ``LogisticRegression`` per head). Here the
``G`` problems (G = layers × heads) share their labels and differ only in features, so they are
solved together as batched tensor problems (blocks of :data:`HEAD_CHUNK` heads): parameters ``W [group, d, class]`` and ``b [group, class]``, the objective the sum
over groups of ``mean_n CE(x_gn W_g + b_g, y_n) + (l2 / 2) ‖W_g‖²`` (the intercept is not
penalised, as in scikit-learn), minimised by L-BFGS. The groups are independent, so the minimum
of the sum is every group's own minimum. scikit-learn's ``LogisticRegression(C=c)`` solves the
same problem with ``l2 = 1 / (c · n)``.

Features are standardised per head and dimension on the training split (:func:`standardise`),
so one ``l2`` suits every head; it is chosen on the dev split (:func:`choose_l2`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4)
"""L2 strengths tried on dev (mean-cross-entropy units), strongest first (each fit warm-starts the next)."""


@dataclass(frozen=True)
class Standardiser:
    """Per-group feature mean and std from a training split: ``mean, std [group, d]``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(x − mean) / std`` for ``x [group, n, d]`` (a new tensor)."""
        return (x - self.mean[:, None]) / self.std[:, None]  # [group, n, d]


def standardise(x: torch.Tensor, eps: float = 1e-6) -> Standardiser:
    """Return the :class:`Standardiser` of training features ``x [group, n, d]`` (constant
    dimensions get std 1, so they stay 0)."""
    mean = x.mean(1)  # [group, d]
    std = x.std(1, unbiased=False)  # [group, d]
    return Standardiser(mean, torch.where(std > eps, std, torch.ones_like(std)))


@dataclass(frozen=True)
class LogReg:
    """Fitted probes: ``weight [group, d, class]``, ``bias [group, class]`` (standardised space)."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``[group, n, class]`` logits of standardised features ``x [group, n, d]``."""
        return torch.baddbmm(self.bias[:, None, :], x, self.weight)  # [group, n, class]

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return each group's accuracy ``[group]`` on ``x [group, n, d]``, labels ``y [n]``."""
        return (self.logits(x).argmax(-1) == y[None]).float().mean(1)  # [group]


HEAD_CHUNK = 16
"""Groups solved per L-BFGS problem. On CPU the whole problem is memory-bound (every evaluation
streams all features); blocks of 16 heads stay in cache and were 1.5× faster than all 270 heads at
once on synthetic features of SmolLM2's size (270 heads × 3000 × 64, 17 classes; this 2-core
machine, one thread), and 1.7× on its UPOS features (`bench/bench_probe.py`, two runs)."""


def fit_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    l2: float,
    max_iter: int = 100,
    init: LogReg | None = None,
    chunk: int = HEAD_CHUNK,
) -> LogReg:
    """Fit every group's L2-regularised multinomial logistic regression and return them, ``chunk``
    groups per batched L-BFGS problem (each group's minimum does not depend on the chunking).

    Args:
        x: standardised features ``[group, n, d]`` (float32 or float64).
        y: labels ``[n]`` in ``0 .. n_classes − 1``, shared by every group.
        n_classes: number of classes (≥ 2).
        l2: strength of ``(l2 / 2) ‖W‖²`` next to the mean cross-entropy.
        max_iter: L-BFGS iterations.
        init: a previous fit to start from (warm start along an l2 path).
        chunk: groups per problem.
    """
    parts = []
    for start in range(0, x.shape[0], chunk):
        part = slice(start, start + chunk)
        warm = LogReg(init.weight[part], init.bias[part], init.l2) if init is not None else None
        parts.append(_fit_block(x[part], y, n_classes, l2, max_iter, warm))
    weight = torch.cat([p.weight for p in parts])  # [group, d, class]
    return LogReg(weight, torch.cat([p.bias for p in parts]), l2)


def _fit_block(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int, init: LogReg | None
) -> LogReg:
    """One batched L-BFGS problem over the groups of ``x [group, n, d]``."""
    groups, n, d = x.shape
    weight = (init.weight.clone() if init is not None else x.new_zeros(groups, d, n_classes)).requires_grad_(
        True
    )  # [group, d, class]
    bias = (init.bias.clone() if init is not None else x.new_zeros(groups, n_classes)).requires_grad_(
        True
    )  # [group, class]
    target = y[None].expand(groups, n).reshape(-1)  # [group * n]
    optimiser = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7 * groups,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = torch.baddbmm(bias[:, None, :], x, weight)  # [group, n, class]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, n_classes), target, reduction="sum") / n
        loss = ce + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return LogReg(weight.detach(), bias.detach(), l2)


def choose_l2(
    train: tuple[torch.Tensor, torch.Tensor],
    dev: tuple[torch.Tensor, torch.Tensor],
    n_classes: int,
    grid: Sequence[float] = L2_GRID,
    max_iter: int = 100,
) -> tuple[LogReg, dict[float, float]]:
    """Fit along ``grid`` (warm-started) and return the fit whose mean dev accuracy over groups is
    highest, with ``{l2: mean dev accuracy}``: one shared strength for every head, chosen on dev.

    ``train`` and ``dev`` are ``(x [group, n, d] standardised, y [n])`` pairs.
    """
    best: LogReg | None = None
    best_acc = -1.0
    path: dict[float, float] = {}
    previous: LogReg | None = None
    for l2 in grid:
        fit = fit_logreg(train[0], train[1], n_classes, l2, max_iter, init=previous)
        acc = float(fit.accuracy(*dev).mean())
        path[l2] = acc
        previous = fit
        if acc > best_acc:
            best, best_acc = fit, acc
    assert best is not None  # grid is never empty (internal)
    return best, path


def raw_direction(fit: LogReg, scaler: Standardiser, positive: int = 1) -> torch.Tensor:
    """Return a binary probe's weight direction in the raw feature space, ``[group, d]``
    (unnormalised): logit(positive) − logit(other) = x · w + c with ``w = (W₁ − W₀) / std``."""
    other = 1 - positive
    return (fit.weight[..., positive] - fit.weight[..., other]) / scaler.std  # [group, d]
