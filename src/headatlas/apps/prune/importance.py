"""Head importance: how much the language-modelling loss depends on each head.

- **gradient** (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): a gate ξ_h = 1
  multiplies each head's output; I_h = Σ_batches |∂L/∂ξ_h| / tokens, with L the batch's mean
  token loss (their accumulation). Cost: one forward + backward per batch for *all* heads.
  Reported raw (``importance_gradient_raw``) and with Michel's normalisation
  (``importance_gradient``): each layer divided by its L2 norm, then a global min–max to
  [0, 1]. The same rule for every layer (Michel's fork treats the last layer differently; we
  do not).
- **ablation** (Voita et al. 2019 and Michel et al. 2019 use removal; here Δloss): per batch,
  the loss increase when one head is zeroed (``ablation-zero``) or replaced by its mean over
  positions (``ablation-mean``), via :func:`headatlas.ablate`; mean and std over batches.
  Cost: one forward per head per batch (270 + 1 forwards per batch on SmolLM2-135M), about
  layers × heads / 2 times the gradient method.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...atlas.table import Atlas
from ...capture import ablate, check_mode
from ...core.errors import check_choice
from ...core.progress import Progress
from ...model.info import LoadedModel
from ..common.evaluation import EvalData, batch_loss, check_lm, head_gates

if TYPE_CHECKING:
    from ...core.heads import Head
    from ...scanning.parallel import WorkerPool

logger = logging.getLogger(__name__)

METHODS = ("gradient", "ablation-zero", "ablation-mean")


@dataclass
class Importance:
    """Importance of every head, ``[layer, head]`` arrays, and what it cost."""

    method: str
    scores: np.ndarray
    std: np.ndarray | None
    raw: np.ndarray | None
    n: int
    seconds: float
    forwards: int
    data: dict[str, object] = field(default_factory=dict)

    def meta(self) -> dict[str, object]:
        """JSON-ready summary for ``atlas.json``."""
        return {
            "method": self.method,
            "seconds": round(self.seconds, 3),
            "forwards": self.forwards,
            "n": self.n,
            "data": self.data,
        }


def michel_normalise(raw: np.ndarray) -> np.ndarray:
    """Each layer divided by its L2 norm (``[layer, head]``), then global min–max to [0, 1]."""
    norms = np.linalg.norm(raw, axis=1, keepdims=True)  # [layer, 1]
    scaled = raw / np.where(norms > 0, norms, 1.0)
    low, high = float(scaled.min()), float(scaled.max())
    return (scaled - low) / (high - low) if high > low else np.zeros_like(scaled)


def gradient_importance(loaded: LoadedModel, data: EvalData, progress: Progress | None = None) -> Importance:
    """Michel et al.'s E|∂L/∂ξ_h| over ``data`` (one forward + backward per batch)."""
    check_lm(loaded)
    started = time.perf_counter()
    info = loaded.info
    total = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64)  # [layer, head]
    tokens = 0
    with head_gates(loaded) as gates, torch.enable_grad():
        for i, batch in enumerate(data.batches):
            loss, n = batch_loss(loaded, batch, seed=i)
            (grad,) = torch.autograd.grad(loss, gates)  # [layer, head]
            total += grad.detach().abs().double().cpu()
            tokens += n
            if progress:
                progress(i + 1, len(data.batches))
    raw = (total / max(tokens, 1)).numpy()
    return Importance(
        "gradient",
        michel_normalise(raw),
        None,
        raw,
        tokens,
        time.perf_counter() - started,
        len(data.batches),
        data.describe(),
    )


def _ablation_deltas(
    loaded: LoadedModel, job: tuple[EvalData, list[Head], str], progress: Progress | None = None
) -> np.ndarray:
    """Loss increase ``[batch, head]`` of each head in ``job`` silenced alone: one unablated and
    one ablated forward per head per batch (a Ray shard, or the whole in-process run)."""
    data, heads, mode = job
    out = np.zeros((len(data.batches), len(heads)))
    total, done = len(data.batches) * (len(heads) + 1), 0
    with torch.no_grad():
        for b, batch in enumerate(data.batches):
            base = float(batch_loss(loaded, batch, seed=b)[0])
            done += 1
            for i, head in enumerate(heads):
                with ablate(loaded, [head], mode=mode):
                    out[b, i] = float(batch_loss(loaded, batch, seed=b)[0]) - base
                done += 1
                if progress:
                    progress(done, total)
    return out


def ablation_importance(
    loaded: LoadedModel,
    data: EvalData,
    mode: str = "zero",
    progress: Progress | None = None,
    pool: WorkerPool | None = None,
) -> Importance:
    """Δloss when each head alone is silenced (``mode`` ``"zero"`` or ``"mean"``): mean, std over batches.

    One forward per head per batch (plus one per batch and shard for the unablated loss); with
    ``pool`` the heads are sharded over its Ray workers.
    """
    check_lm(loaded)
    check_mode(mode)
    started = time.perf_counter()
    info = loaded.info
    heads = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    deltas = np.zeros((len(data.batches), info.n_layers, info.n_heads))  # [batch, layer, head]
    if pool is None:  # one unablated forward per batch for all heads
        jobs = [(data, heads, mode)]
        results: Any = [(jobs[0], _ablation_deltas(loaded, jobs[0], progress))]
    else:
        per = max(1, len(heads) // (4 * pool.workers))
        jobs = [(data, heads[i : i + per], mode) for i in range(0, len(heads), per)]
        results = pool.map_unordered(_keyed_deltas, jobs)
    forwards = 0
    for done, (job, values) in enumerate(results, start=1):
        for i, (layer, head) in enumerate(job[1]):
            deltas[:, layer, head] = values[:, i]
        forwards += len(data.batches) * (len(job[1]) + 1)
        if progress and pool is not None:
            progress(done, len(jobs))
    return Importance(
        f"ablation-{mode}",
        deltas.mean(axis=0),
        deltas.std(axis=0),
        None,
        len(data.batches),
        time.perf_counter() - started,
        forwards,
        data.describe(),
    )


def _keyed_deltas(loaded: LoadedModel, job: tuple[EvalData, list[Head], str]) -> tuple[Any, np.ndarray]:
    return job, _ablation_deltas(loaded, job)


def compute_importance(
    loaded: LoadedModel,
    data: EvalData,
    method: str = "gradient",
    progress: Progress | None = None,
    pool: WorkerPool | None = None,
) -> Importance:
    """Dispatch on ``method`` (one of :data:`METHODS`); ablation runs on ``pool`` when given."""
    if method == "gradient":
        return gradient_importance(loaded, data, progress)
    check_choice("method", method, METHODS)
    return ablation_importance(loaded, data, method.split("-", 1)[1], progress, pool)


def write_importance(atlas: Atlas, result: Importance) -> None:
    """Add the result's columns to ``atlas`` and its metadata."""
    if result.method == "gradient":
        atlas.set_matrix("importance_gradient", result.scores)
        if result.raw is not None:
            atlas.set_matrix("importance_gradient_raw", result.raw)
        atlas.set_matrix("importance_gradient_n", np.full(result.scores.shape, result.n))
        atlas.meta.setdefault("importance", {})["gradient"] = result.meta()
    else:
        atlas.set_matrix("importance_ablation", result.scores)
        if result.std is not None:
            atlas.set_matrix("importance_ablation_std", result.std)
        atlas.set_matrix("importance_ablation_n", np.full(result.scores.shape, result.n))
        atlas.meta.setdefault("importance", {})["ablation"] = result.meta()
