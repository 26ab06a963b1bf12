"""SEEKR's pieces (He et al. 2024, "SEEKR: Selective Attention-Guided Knowledge Retention for
Continual Learning of Large Language Models"): attention distillation on chosen heads, and the
head importance that chooses them (forgettability × task sensitivity).

- The distillation loss is the KL divergence from the frozen previous model's attention rows to
  the student's, summed over keys and averaged over the chosen heads and the real query rows of
  the replay examples. Both sides' attention comes from the one capture path
  (:func:`headatlas.capture.capture` with ``grad=True``), so the student's maps carry gradients to
  its queries and keys, and through them to every parameter before the chosen heads — only there.
- Task sensitivity: the first-order Taylor estimate of the replay loss's change when a head is
  removed, ``|Σ z·∂L/∂z|`` over the head's output ``z`` (Michel et al. 2019's gate, through
  :func:`headatlas.capture.head_outputs`). SEEKR applies the Taylor estimate to attention weights;
  with the fused SDPA output the attention map is not a node of the graph, so the head output is.
- Forgettability: how far a head's attention on the replay examples moves when the model takes a
  few plain fine-tuning steps on the new task (mean total-variation distance per query row).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ...atlas.table import Atlas, check_same_model
from ...capture import DenseView, attention_maps, capture, head_outputs
from ...capture.views import AttentionView
from ...core.errors import HeadatlasError, param
from ...core.heads import Head, heads_by_layer
from ...model.info import LoadedModel
from .data import Batch, answer_logits

EPS = 1e-12
"""Floor on student probabilities inside the KL's logarithm (a real key never has exactly 0)."""


def check_heads_k(k: int, n_layers: int, n_heads: int) -> None:
    """Raise :class:`HeadatlasError` unless ``1 <= k <= n_layers * n_heads``."""
    total = n_layers * n_heads
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise HeadatlasError(f"{param('k')} must be a whole number of heads in [1, {total}], got {k!r}")


def top_heads(scores: np.ndarray, k: int) -> list[Head]:
    """Return the ``k`` heads with the highest ``scores [layer, head]`` (NaN last; ties go to the
    lower layer, then the lower head, so the choice is deterministic), sorted by (layer, head)."""
    n_layers, n_heads = scores.shape
    check_heads_k(k, n_layers, n_heads)
    flat = np.nan_to_num(np.asarray(scores, dtype=float).ravel(), nan=-np.inf)  # [layer * head]
    order = np.argsort(-flat, kind="stable")[:k]
    return sorted((int(i) // n_heads, int(i) % n_heads) for i in order)


def atlas_heads(loaded: LoadedModel, atlas_dir: str, score: str, k: int) -> list[Head]:
    """Return the top ``k`` heads by atlas column ``score`` (highest first) of the atlas in
    ``atlas_dir``, checked to be of ``loaded``'s model."""
    atlas = Atlas.load(atlas_dir)
    check_same_model(atlas, loaded.info, atlas_dir)
    return top_heads(atlas.matrix(score), k)


def head_attention(
    loaded: LoadedModel, batch: Batch, heads: Sequence[Head], grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``batch`` once through the capture path and return ``(maps, hidden)``:
    ``maps [batch, len(heads), seq, seq]`` the attention of ``heads`` (in (layer, head) order),
    differentiable when ``grad``, and ``hidden [batch, seq, d_model]`` the body's last hidden state."""
    chosen = sorted(set(heads))
    by_layer = heads_by_layer(chosen)
    blocks: dict[int, list[torch.Tensor]] = {}

    def keep(view: AttentionView) -> None:
        if view.layer in by_layer and isinstance(view, DenseView):
            blocks.setdefault(view.layer, []).append(view.probs[:, by_layer[view.layer]])

    with capture(loaded, keep, mode="dense", grad=grad) as session:
        hidden = session.run(batch.input_ids, batch.attention_mask, with_head=False)
    missing = [layer for layer in by_layer if layer not in blocks]
    if missing:
        raise HeadatlasError(f"layer {missing[0]} sent no attention to distil (an encoder–decoder model?)")
    per_layer = [torch.cat(blocks[layer], dim=2) for layer in sorted(by_layer)]  # [batch, h_l, seq, seq]
    return torch.cat(per_layer, dim=1), hidden  # [batch, heads, seq, seq], [batch, seq, d_model]


def attention_kd(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return SEEKR's attention-distillation loss: mean over heads and real query rows of
    ``KL(teacher row ‖ student row)``; ``student``/``teacher`` ``[batch, head, query, key]``,
    ``attention_mask [batch, seq]``. Exactly zero when the student's maps equal the teacher's."""
    if student.shape != teacher.shape:
        raise HeadatlasError(f"student maps {tuple(student.shape)} ≠ teacher maps {tuple(teacher.shape)}")
    t = teacher.detach().float()
    s = student.float()
    log_ratio = torch.log(t.clamp_min(EPS)) - torch.log(s.clamp_min(EPS))  # [batch, head, query, key]
    kl = torch.where(t > 0, t * log_ratio, torch.zeros_like(t)).sum(-1)  # [batch, head, query]
    rows = attention_mask.to(kl.device)[:, None, : kl.shape[-1]].expand_as(kl).float()  # [batch, head, query]
    return (kl * rows).sum() / rows.sum().clamp_min(1.0)


def lm_loss(loaded: LoadedModel, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return the mean cross-entropy of the answer tokens (``hidden [batch, seq, d_model]``)."""
    target = target.to(hidden.device)
    logits = answer_logits(loaded, hidden, target)  # [n_answer_tokens, vocab]
    return torch.nn.functional.cross_entropy(logits, target[target >= 0])


def task_sensitivity(loaded: LoadedModel, batch: Batch) -> np.ndarray:
    """Return ``[layer, head]`` task sensitivity on ``batch``: ``|Σ z·∂L/∂z|`` per head, the
    first-order Taylor estimate of the answer loss's change when the head's output ``z`` is
    removed (Michel et al. 2019; SEEKR's task-sensitivity measure, on head outputs). Leaves no
    gradient on the model's parameters."""
    info = loaded.info
    device = loaded.device
    gates = torch.ones(info.n_layers, info.n_heads, device=device, requires_grad=True)  # [layer, head]

    def gate(layer: int, z: torch.Tensor, _context: object) -> torch.Tensor:
        return z * gates[layer].to(z.dtype)[None, None, :, None]  # [batch, query, head, d_head]

    with head_outputs(loaded, gate), torch.enable_grad():
        hidden = loaded.model.base_model(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
        ).last_hidden_state  # [batch, seq, d_model]
        loss = lm_loss(loaded, hidden, batch.target)
        (grad,) = torch.autograd.grad(loss, gates)
    return grad.abs().detach().cpu().numpy().astype(float)


def all_maps(loaded: LoadedModel, batch: Batch) -> torch.Tensor:
    """Return every head's attention on ``batch`` as ``[layer, batch, head, seq, seq]`` (no grad)."""
    maps = attention_maps(loaded, batch.input_ids, batch.attention_mask)
    return torch.stack([maps[layer] for layer in sorted(maps)])


def forgettability(before: torch.Tensor, after: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """Return ``[layer, head]`` forgettability: the mean total-variation distance
    ``½ Σ_k |A_after − A_before|`` over the real query rows, between two :func:`all_maps` results."""
    tv = 0.5 * (after - before).abs().sum(-1)  # [layer, batch, head, query]
    rows = attention_mask[None, :, None, : tv.shape[-1]].expand_as(tv).float()  # [layer, batch, head, query]
    per_head = (tv * rows).sum(dim=(1, 3)) / rows.sum(dim=(1, 3)).clamp_min(1.0)  # [layer, head]
    return per_head.cpu().numpy().astype(float)


def seekr_importance(sensitivity: np.ndarray, forget: np.ndarray) -> np.ndarray:
    """Return SEEKR's head importance ``[layer, head]``: forgettability × task sensitivity, each
    divided by its maximum first (so neither scale dominates)."""

    def unit(x: np.ndarray) -> np.ndarray:
        top = float(np.nanmax(x)) if np.isfinite(x).any() else 0.0
        return x / top if top > 0 else np.zeros_like(x)

    return unit(np.asarray(sensitivity, dtype=float)) * unit(np.asarray(forget, dtype=float))
