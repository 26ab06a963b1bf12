"""Rankings of heads for circuits: exact activation patching, attribution patching, EAP-IG at head
level, an atlas column, or random.

Every method scores a head on the task's clean / counterfactual pairs by how much of the metric
(logit difference answer − wrong) it restores when its output goes from the counterfactual value
to the clean one, at every position:

- ``activation``: exact, one head patched at a time (:func:`.patching.activation_patching`).
- ``attribution``: the first-order estimate ``(z_clean − z_cf) · ∂m/∂z`` at the counterfactual run
  (Nanda 2023; Syed et al. 2023), one forward and one backward.
- ``eap-ig``: integrated gradients (Sundararajan et al. 2017) of the metric with respect to each
  head's output along the straight path ``z(α) = z_cf + α (z_clean − z_cf)``, every head moved
  together on the counterfactual run (the activation form of EAP-IG: Hanna et al. 2024,
  "Have Faith in Faithfulness"; MIB's ``eap-ig-activations``, at head rather than edge level).
  The integral is the left Riemann sum over ``α = 0, 1/steps, …`` and steps run as rows of one
  batch; with one step it is attribution patching exactly. Each head's output takes its path value
  while gradients still flow through it to later heads (``z + (z(α) − z).detach()``).
- ``atlas:<score>``: a column of an atlas, highest first.
- ``random``: a seeded permutation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from ...atlas.table import Atlas
from ...capture import head_outputs, padded_positions
from ...core.errors import HeadatlasError
from ...core.progress import Progress
from ...model.info import LoadedModel
from ..common.patch_tasks import metric
from .faithfulness import Prepared
from .patching import activation_patching, attribution_patching

METHODS = ("activation", "attribution", "eap-ig", "random")
"""Ranking methods (and ``atlas:<score>``)."""


def eap_ig(loaded: LoadedModel, prep: Prepared, steps: int = 8, rows_per_pass: int = 32) -> torch.Tensor:
    """Return every head's EAP-IG score ``[pair, layer, head]`` (see the module docstring): the
    integrated-gradient estimate of the metric change when the head goes from its counterfactual
    output to its clean one, summed over positions and ``d_head``."""
    if steps < 1:
        raise HeadatlasError(f"EAP-IG needs at least 1 step, got {steps}")
    info = loaded.info
    n_pairs = prep.ids.shape[0]
    device = loaded.device
    deltas = {layer: prep.clean_z[layer] - prep.corrupt_z[layer] for layer in prep.clean_z}
    scores = torch.zeros(n_pairs, info.n_layers, info.n_heads, dtype=torch.float64)
    rows = [(s, p) for s in range(steps) for p in range(n_pairs)]
    answer, wrong = prep.enc.answer.to(device), prep.enc.wrong.to(device)
    embed = loaded.model.get_input_embeddings()

    def along(
        layer: int, z: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]
    ) -> torch.Tensor:
        alpha, pairs, kept = ctx
        a = alpha.to(z)[:, None, None, None]  # [row, 1, 1, 1]
        target = prep.corrupt_z[layer][pairs].to(z) + a * deltas[layer][pairs].to(
            z
        )  # [row, query, head, d_head]
        out = z + (target - z).detach()  # the path's value, gradient through z
        kept[layer] = out
        return out

    with head_outputs(loaded, along) as tap, torch.enable_grad():
        for start in range(0, len(rows), max(1, rows_per_pass)):
            chunk = rows[start : start + max(1, rows_per_pass)]
            alpha = torch.tensor([s / steps for s, _ in chunk])  # [row]
            pairs = torch.tensor([p for _, p in chunk])  # [row]
            kept: dict[int, torch.Tensor] = {}
            tap.context = (alpha, pairs, kept)
            mask = prep.mask[pairs].to(device)
            embeds = embed(prep.corrupt_ids[pairs].to(device)).detach().requires_grad_(True)
            logits = loaded.model(
                inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1,
                **padded_positions(loaded.model, mask),
            ).logits[:, -1]  # fmt: skip
            total = metric(logits, answer[pairs], wrong[pairs], "logit_diff").sum()
            layers = sorted(kept)
            grads = torch.autograd.grad(total, [kept[layer] for layer in layers])
            for layer, grad in zip(layers, grads, strict=True):
                # [row, query, head, d_head] -> [row, head]
                per_row = (deltas[layer][pairs].to(grad) * grad).sum((1, 3)).double().cpu()
                scores[:, layer].index_add_(0, pairs, per_row / steps)
    return scores


def method_scores(
    loaded: LoadedModel,
    prep: Prepared,
    method: str,
    steps: int = 8,
    rows_per_pass: int = 64,
    progress: Progress | None = None,
) -> tuple[np.ndarray, float]:
    """Return ``(score [layer, head], seconds)``: the mean over pairs of a method's effect, as a
    share of the clean − counterfactual metric gap, and the wall time it took."""
    start = time.perf_counter()
    base = prep.corrupt_metric  # [pair]
    if method == "activation":
        values = activation_patching(
            loaded, prep.enc, prep.clean_z, "logit_diff", "all", rows_per_pass, progress
        )
        per_pair = values - base[:, None, None]
    elif method == "attribution":
        per_pair = attribution_patching(loaded, prep.enc, prep.clean_z, "logit_diff", "all")
    elif method == "eap-ig":
        per_pair = eap_ig(loaded, prep, steps, rows_per_pass).float()
    else:
        raise HeadatlasError(f"unknown method {method!r}: use {', '.join(METHODS)} or atlas:<score>")
    gap = float((prep.clean_metric - base).mean())
    scale = gap if abs(gap) > 1e-9 else 1.0
    return (per_pair.mean(0) / scale).numpy(), time.perf_counter() - start


def order_by(score: np.ndarray, absolute: bool = False) -> list[tuple[int, int]]:
    """Return all heads ordered by ``score [layer, head]``, highest first (by |score| when
    ``absolute``); NaN last, ties in (layer, head) order."""
    values = np.abs(score) if absolute else np.asarray(score, dtype=np.float64)
    flat = np.where(np.isnan(values), -np.inf, values).ravel()
    order = np.argsort(-flat, kind="stable")
    n_heads = score.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def random_order(n_layers: int, n_heads: int, seed: int) -> list[tuple[int, int]]:
    """Return all heads in a seeded random order."""
    perm = np.random.default_rng(seed).permutation(n_layers * n_heads)
    return [(int(i) // n_heads, int(i) % n_heads) for i in perm]


def atlas_scores(atlas: Atlas, score: str) -> np.ndarray:
    """Return ``atlas``'s column ``score`` as ``[layer, head]``; one-line error naming the columns."""
    if score not in atlas.score_columns:
        known = ", ".join(sorted(atlas.score_columns)[:12])
        raise HeadatlasError(f"the atlas has no score {score!r} (it has {known}, …)")
    return np.asarray(atlas.matrix(score), dtype=np.float64)


def top_heads(order: Sequence[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    """Return the first ``k`` heads of ``order``."""
    return list(order[: max(0, k)])
