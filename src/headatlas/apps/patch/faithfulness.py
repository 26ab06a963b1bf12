"""Head-level circuits measured by faithfulness curves (Mueller et al. 2025, MIB).

A *circuit* of size k is the top-k attention heads of a ranking; every other head is ablated
(MLPs and embeddings stay as they are) on the one head-output hook,
:func:`headatlas.capture.head_outputs`, at every position:

- ``mean``: the head's mean output over the task's clean prompts, position by position counted
  from the end of the (left-padded) prompt, over the prompts that have that position (Wang et al.
  2022's mean ablation, per position);
- ``counterfactual``: the head's output on the pair's counterfactual prompt (same length);
- ``zero``: 0 (Michel et al. 2019's gate at 0).

With m the task's mean logit difference (answer − wrong), M the full model and ∅ the circuit with
no head, the faithfulness of a circuit C is f(C) = (m(C) − m(∅)) / (m(M) − m(∅)), so f(all heads)
= 1 and f(no head) = 0 by construction. Over the normalised size axis x = k / (number of heads),
**CPR** is the area under f (higher is better) and **CMD** the area under |1 − f| (lower is better),
both by the trapezoid rule over the measured sizes (0 and all heads always included). Many
(circuit, pair) rows run in one batch: a row's callback keeps its circuit's heads and replaces the
rest.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...batteries.base import make_batch, pad_id
from ...capture import head_outputs, padded_positions
from ...core.errors import HeadatlasError, check_choice
from ...core.progress import Progress
from ...model.info import LoadedModel
from ..common.patch_tasks import Encoded, metric

ABLATIONS = ("mean", "counterfactual", "zero")
"""How heads outside a circuit are silenced."""
THRESHOLD = 0.9
"""The faithfulness a circuit must reach to count as the minimal circuit."""


@dataclass
class Prepared:
    """A task ready for circuits: left-padded clean and counterfactual batches, every head's output
    on both at every position, the per-position clean means and the clean metric."""

    enc: Encoded
    ids: torch.Tensor  # [pair, query] clean, left-padded
    mask: torch.Tensor  # [pair, query]
    corrupt_ids: torch.Tensor  # [pair, query]
    clean_z: dict[int, torch.Tensor]  # layer -> [pair, query, head, d_head]
    corrupt_z: dict[int, torch.Tensor]  # layer -> [pair, query, head, d_head]
    means: dict[int, torch.Tensor]  # layer -> [query, head, d_head]
    clean_metric: torch.Tensor  # [pair]
    corrupt_metric: torch.Tensor  # [pair]
    accuracy: float


def _forward(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    device = loaded.device
    mask = mask.to(device)
    out = loaded.model(
        input_ids=ids.to(device),
        attention_mask=mask,
        logits_to_keep=1,
        **padded_positions(loaded.model, mask),
    )
    return out.logits[:, -1]  # [batch, vocab]


def _record(
    loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor, _ctx: object) -> None:
        kept[layer] = z.detach().clone()  # [pair, query, head, d_head]

    with head_outputs(loaded, keep), torch.no_grad():
        logits = _forward(loaded, ids, mask)
    return kept, logits


def prepare(loaded: LoadedModel, enc: Encoded) -> Prepared:
    """Run the clean and counterfactual prompts once and keep what every circuit needs.

    Raises :class:`HeadatlasError` when clean and counterfactual prompts differ in length.
    """
    if not loaded.info.causal:
        raise HeadatlasError("circuits read next-token logits: give a decoder (causal) language model")
    pad = pad_id(loaded.tokenizer)
    clean, corrupt = make_batch(enc.clean, pad), make_batch(enc.corrupt, pad)
    if not torch.equal(clean.attention_mask, corrupt.attention_mask):
        raise HeadatlasError("clean and counterfactual prompts differ in length: circuits need equal lengths")
    clean_z, clean_logits = _record(loaded, clean.input_ids, clean.attention_mask)
    corrupt_z, corrupt_logits = _record(loaded, corrupt.input_ids, corrupt.attention_mask)
    valid = clean.attention_mask.to(torch.float32)[:, :, None, None]  # [pair, query, 1, 1]
    count = valid.sum(0).clamp_min(1.0)  # [query, 1, 1]
    means = {
        layer: (z.float() * valid.to(z.device)).sum(0) / count.to(z.device) for layer, z in clean_z.items()
    }
    answer, wrong = enc.answer.to(loaded.device), enc.wrong.to(loaded.device)
    clean_m = metric(clean_logits, answer, wrong, "logit_diff").cpu()
    corrupt_m = metric(corrupt_logits, answer, wrong, "logit_diff").cpu()
    accuracy = float((clean_m > 0).float().mean())
    return Prepared(
        enc, clean.input_ids, clean.attention_mask, corrupt.input_ids, clean_z, corrupt_z, means,
        clean_m, corrupt_m, accuracy,
    )  # fmt: skip


def _replacement(
    prep: Prepared, layer: int, pairs: torch.Tensor, ablation: str, like: torch.Tensor
) -> torch.Tensor:
    if ablation == "zero":
        return torch.zeros_like(like)
    if ablation == "mean":
        return prep.means[layer].to(like)[None].expand_as(like)  # [row, query, head, d_head]
    return prep.corrupt_z[layer][pairs].to(like)  # [row, query, head, d_head]


def circuit_metrics(
    loaded: LoadedModel,
    prep: Prepared,
    keep: torch.Tensor,
    ablation: str = "mean",
    rows_per_pass: int = 64,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Return the mean metric over pairs ``[circuit]`` of each circuit ``keep [circuit, layer, head]``
    (True = kept, False = ablated the ``ablation`` way), many (circuit, pair) rows per forward pass."""
    check_choice("ablation", ablation, ABLATIONS)
    n_pairs = prep.ids.shape[0]
    rows = [(c, p) for c in range(keep.shape[0]) for p in range(n_pairs)]
    sums = torch.zeros(keep.shape[0], dtype=torch.float64)
    step = max(1, rows_per_pass)
    chunks = [rows[i : i + step] for i in range(0, len(rows), step)]

    def silence(layer: int, z: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        circuits, pairs = ctx
        kept = keep[circuits, layer].to(z.device)[:, None, :, None]  # [row, 1, head, 1]
        return torch.where(kept, z, _replacement(prep, layer, pairs, ablation, z))

    answer, wrong = prep.enc.answer.to(loaded.device), prep.enc.wrong.to(loaded.device)
    with head_outputs(loaded, silence) as tap, torch.no_grad():
        for done, chunk in enumerate(chunks, start=1):
            circuits = torch.tensor([c for c, _ in chunk])
            pairs = torch.tensor([p for _, p in chunk])
            tap.context = (circuits, pairs)
            logits = _forward(loaded, prep.ids[pairs], prep.mask[pairs])
            values = metric(logits, answer[pairs], wrong[pairs], "logit_diff").double().cpu()
            sums.index_add_(0, circuits, values)
            if progress is not None:
                progress(done, len(chunks))
    return sums / n_pairs


def ranking_masks(
    order: Sequence[tuple[int, int]], sizes: Sequence[int], n_layers: int, n_heads: int
) -> torch.Tensor:
    """Return ``[size, layer, head]`` masks: the first ``k`` heads of ``order`` for each ``k``."""
    masks = torch.zeros(len(sizes), n_layers, n_heads, dtype=torch.bool)
    for i, k in enumerate(sizes):
        for layer, head in order[:k]:
            masks[i, layer, head] = True
    return masks


def areas(sizes: Sequence[int], faithfulness: Sequence[float], total: int) -> tuple[float, float]:
    """Return ``(CPR, CMD)``: the trapezoid areas of f and of |1 − f| over x = k / total (Mueller et
    al. 2025). ``sizes`` must be increasing; the curve is integrated over the sizes given."""
    x = np.asarray(sizes, dtype=np.float64) / total
    f = np.asarray(faithfulness, dtype=np.float64)
    if len(x) < 2 or np.any(np.diff(x) <= 0):
        raise HeadatlasError("a faithfulness curve needs at least two increasing sizes")
    return float(np.trapezoid(f, x)), float(np.trapezoid(np.abs(1.0 - f), x))


def minimal_size(
    sizes: Sequence[int], faithfulness: Sequence[float], threshold: float = THRESHOLD
) -> int | None:
    """Return the smallest measured size whose faithfulness reaches ``threshold`` (None if none)."""
    for k, f in zip(sizes, faithfulness, strict=True):
        if f >= threshold:
            return int(k)
    return None


def stable_size(
    sizes: Sequence[int], faithfulness: Sequence[float], threshold: float = THRESHOLD
) -> int | None:
    """Return the smallest measured size from which every larger measured circuit keeps f ≥ ``threshold``
    (curves are not monotone: a head that works against the answer can lift f above 1 early)."""
    found = None
    for k, f in zip(reversed(list(sizes)), reversed(list(faithfulness)), strict=True):
        if f < threshold:
            break
        found = int(k)
    return found


def full_sizes(sizes: Sequence[int], total: int) -> list[int]:
    """Return ``sizes`` clipped to ``[0, total]``, sorted, deduplicated, with 0 and ``total`` added."""
    return sorted({0, total, *(min(max(int(k), 0), total) for k in sizes)})


@dataclass
class Curve:
    """One ranking's faithfulness curve."""

    sizes: list[int]
    faithfulness: list[float]
    metric: list[float]
    cpr: float
    cmd: float
    minimal_k: int | None
    stable_k: int | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return the curve as plain JSON-ready data."""
        return {
            "sizes": self.sizes,
            "faithfulness": [round(f, 6) for f in self.faithfulness],
            "metric": [round(m, 6) for m in self.metric],
            "cpr": round(self.cpr, 6),
            "cmd": round(self.cmd, 6),
            "minimal_k": self.minimal_k,
            "stable_k": self.stable_k,
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


def faithfulness_curve(
    loaded: LoadedModel,
    prep: Prepared,
    order: Sequence[tuple[int, int]],
    sizes: Sequence[int],
    ablation: str = "mean",
    rows_per_pass: int = 64,
    progress: Progress | None = None,
) -> Curve:
    """Return the faithfulness curve of the ranking ``order`` (heads, most important first).

    ``sizes`` are completed with 0 and all heads, which define m(∅) and m(M) (so f is exactly 0 and 1
    there); CPR, CMD and the minimal size with f ≥ 0.9 follow (Mueller et al. 2025, MIB).
    """
    info = loaded.info
    total = info.n_layers * info.n_heads
    if len(set(order)) != total:
        raise HeadatlasError(f"a ranking must order all {total} heads once, got {len(set(order))}")
    start = time.perf_counter()
    ks = full_sizes(sizes, total)
    masks = ranking_masks(order, ks, info.n_layers, info.n_heads)
    values = circuit_metrics(loaded, prep, masks, ablation, rows_per_pass, progress).tolist()
    empty, full = values[0], values[-1]
    if abs(full - empty) < 1e-9:
        raise HeadatlasError(
            f"ablating every head leaves the metric where it was ({full:.4f}): faithfulness is undefined"
        )
    f = [(v - empty) / (full - empty) for v in values]
    cpr, cmd = areas(ks, f, total)
    return Curve(
        ks, f, values, cpr, cmd, minimal_size(ks, f), stable_size(ks, f), time.perf_counter() - start
    )
