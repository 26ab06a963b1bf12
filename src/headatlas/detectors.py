"""Head detectors: pure functions from an attention block to per-row scores.

A detector takes ``probs [batch, head, query, key]`` (one layer, a block of query rows) and a
:class:`Rows` context, and returns ``{score_name: Score}``, where ``Score.values`` holds one
value per (batch, head, query row) and ``Score.valid [batch, query]`` says which rows count.
Scan averages values over valid rows of a whole battery. Detectors never mutate their inputs,
never touch the model, and are registered in the explicit :data:`DETECTORS` dict.

Where we differ from TransformerLens' ``head_detector``: scores are per row (so mean, std and
count are reported), the first token of a causal sequence is excluded (its row is forced to
``A[0, 0] = 1``), and left padding is handled through logical positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LOCAL_WINDOW = 4
MAX_OFFSET = 64


@dataclass(frozen=True)
class Rows:
    """What detectors know about a block's query rows and the batch's keys.

    Attributes:
        q_index: ``[query]`` key-axis index of each row of the block.
        n_keys: ``[batch, query]`` keys each row may attend to.
        positions: ``[batch, key]`` logical position of each token (0 = first real token, -1 = padding).
        word_ids: ``[batch, key]`` word index of each token, unique within a sequence (-1 = none).
        period: length P of the repeated segment (``repeat`` battery), else ``None``.
        repeat_start: logical position where the first copy of the repeated segment starts.
        window: local window width w.
        max_offset: number of offsets 0..max_offset-1 in the distance profile.
    """

    q_index: torch.Tensor
    n_keys: torch.Tensor
    positions: torch.Tensor
    word_ids: torch.Tensor | None = None
    period: int | None = None
    repeat_start: int = 1
    window: int = LOCAL_WINDOW
    max_offset: int = MAX_OFFSET

    @property
    def q_positions(self) -> torch.Tensor:
        """Logical positions of the block's query rows, ``[batch, query]``."""
        return self.positions[:, self.q_index]


@dataclass(frozen=True)
class Score:
    """Per-row values of one score: ``values [batch, head, query(, offset)]``, ``valid [batch, query(, offset)]``."""

    values: torch.Tensor
    valid: torch.Tensor


Detector = Callable[[torch.Tensor, Rows], dict[str, Score]]


def offset_mass(probs: torch.Tensor, q_index: torch.Tensor, offset: int) -> torch.Tensor:
    """Return ``A[i, i - offset]`` for every row, ``[batch, head, query]`` (0 where the key is out of range)."""
    keys = q_index - offset  # [query]
    inside = (keys >= 0) & (keys < probs.shape[-1])  # [query]
    idx = keys.clamp(0, probs.shape[-1] - 1)  # [query]
    batch, heads, n_query, _ = probs.shape
    values = probs.gather(-1, idx.view(1, 1, n_query, 1).expand(batch, heads, n_query, 1)).squeeze(-1)
    return values * inside  # [batch, head, query]


def positional(probs: torch.Tensor, rows: Rows) -> dict[str, Score]:
    """Positional scores (Clark et al. 2019, "What Does BERT Look At?"; Voita et al. 2019).

    - ``previous_token``: mean_i A[i, i-1] (TransformerLens previous-token pattern, "mul").
    - ``self``: mean_i A[i, i] (diagonal pattern).
    - ``first_token``: mean_i A[i, first real token] — the attention sink of Xiao et al. 2023
      ("Efficient Streaming Language Models with Attention Sinks"), vertical pattern.
    - ``local``: mean_i Σ_{i-w<j≤i} A[i, j], w = ``rows.window`` (block pattern); rows with fewer
      than w earlier tokens are left out.

    Rows are queries at logical position ≥ 1. Shapes: ``probs [batch, head, query, key]`` →
    values ``[batch, head, query]``, valid ``[batch, query]``.
    """
    pos = rows.q_positions  # [batch, query]
    ok = pos >= 1  # [batch, query]
    first_idx = (rows.positions == 0).float().argmax(dim=-1)  # [batch]
    first = probs.gather(-1, first_idx.view(-1, 1, 1, 1).expand(*probs.shape[:-1], 1)).squeeze(
        -1
    )  # [batch, head, query]
    local = sum(offset_mass(probs, rows.q_index, d) for d in range(rows.window))  # [batch, head, query]
    return {
        "previous_token": Score(offset_mass(probs, rows.q_index, 1), ok),
        "self": Score(offset_mass(probs, rows.q_index, 0), ok),
        "first_token": Score(first, ok),
        "local": Score(torch.as_tensor(local), ok & (pos >= rows.window - 1)),
    }


def entropy(probs: torch.Tensor, rows: Rows) -> dict[str, Score]:
    """Attention entropy per row in nats, −Σ_j A log A, and normalised by log(number of allowed keys).

    Entropy of attention as a measure of head specialisation follows Clark et al. 2019 (who
    smooth A first; we use exact A with 0·log 0 = 0). Rows with fewer than 2 allowed keys are
    left out. Shapes: ``probs [batch, head, query, key]`` → ``[batch, head, query]``.
    """
    ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # [batch, head, query]
    n = rows.n_keys.to(probs.dtype)  # [batch, query]
    ok = (rows.q_positions >= 1) & (n >= 2)  # [batch, query]
    norm = ent / torch.log(n.clamp_min(2.0))[:, None, :]  # [batch, head, query]
    return {"entropy": Score(ent, ok), "entropy_norm": Score(norm, ok)}


def subword(probs: torch.Tensor, rows: Rows) -> dict[str, Score]:
    """Subword score: on tokens that continue a word, the mass on the other pieces of that word.

    A token continues a word when the previous token has the same word id (BPE pieces of one
    pre-tokenised word). Subword heads are described in Clark et al. 2019's analysis of split
    words. Shapes: ``probs [batch, head, query, key]`` → ``[batch, head, query]``.
    """
    if rows.word_ids is None:
        empty = torch.zeros(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
        return {"subword": Score(empty, torch.zeros_like(rows.n_keys, dtype=torch.bool))}
    wid_q = rows.word_ids[:, rows.q_index]  # [batch, query]
    prev_idx = (rows.q_index - 1).clamp_min(0)  # [query]
    wid_prev = rows.word_ids[:, prev_idx]  # [batch, query]
    continues = (wid_q >= 0) & (wid_q == wid_prev) & (rows.q_index >= 1)  # [batch, query]
    same = rows.word_ids[:, None, :] == wid_q[:, :, None]  # [batch, query, key]
    not_self = rows.q_index[:, None] != torch.arange(probs.shape[-1], device=probs.device)[None, :]
    same = same & not_self[None] & (wid_q >= 0)[:, :, None]  # [batch, query, key]
    mass = (probs * same[:, None].to(probs.dtype)).sum(-1)  # [batch, head, query]
    return {"subword": Score(mass, continues)}


def distance(probs: torch.Tensor, rows: Rows) -> dict[str, Score]:
    """Distance profile: mean attention mass at relative offset d = i − j, d = 0..max_offset−1.

    The positional-head view of Voita et al. 2019 / Clark et al. 2019 as a vector per head.
    Row i counts for offset d when the key i − d is a real token. Shapes: ``probs [batch, head,
    query, key]`` → values ``[batch, head, query, offset]``, valid ``[batch, query, offset]``.
    """
    pos = rows.q_positions  # [batch, query]
    offsets = range(rows.max_offset)
    values = torch.stack([offset_mass(probs, rows.q_index, d) for d in offsets], dim=-1)
    d = torch.arange(rows.max_offset, device=probs.device)  # [offset]
    valid = (pos[..., None] >= d) & (pos[..., None] >= 1)  # [batch, query, offset]
    return {"distance_profile": Score(values, valid)}


def repeat(probs: torch.Tensor, rows: Rows) -> dict[str, Score]:
    """Induction and duplicate-token scores on a sequence ``[BOS?, x, x]`` with ``|x| = P``.

    - ``induction``: mean A[i, i−P+1] over the second copy — attention to the token that followed
      the current token's earlier occurrence (Olsson et al. 2022, "In-context Learning and
      Induction Heads"; TransformerLens induction pattern, "mul" measure).
    - ``duplicate_token``: mean A[i, i−P] — attention to the earlier occurrence of the same token
      (Wang et al. 2022, "Interpretability in the Wild").

    Shapes: ``probs [batch, head, query, key]`` → ``[batch, head, query]``.
    """
    if rows.period is None:
        raise ValueError("the repeat detector needs rows.period")
    period = rows.period
    pos = rows.q_positions  # [batch, query]
    second = (pos >= rows.repeat_start + period) & (pos < rows.repeat_start + 2 * period)  # [batch, query]
    return {
        "induction": Score(offset_mass(probs, rows.q_index, period - 1), second),
        "duplicate_token": Score(offset_mass(probs, rows.q_index, period), second),
    }


DETECTORS: dict[str, Detector] = {
    "positional": positional,
    "entropy": entropy,
    "subword": subword,
    "distance": distance,
    "repeat": repeat,
}
"""Every detector by name. Each returns the scores listed in :data:`DETECTOR_SCORES`."""

DETECTOR_SCORES: dict[str, tuple[str, ...]] = {
    "positional": ("previous_token", "self", "first_token", "local"),
    "entropy": ("entropy", "entropy_norm"),
    "subword": ("subword",),
    "distance": ("distance_profile",),
    "repeat": ("induction", "duplicate_token"),
}

VECTOR_SCORES = frozenset({"distance_profile"})
"""Scores with a vector per head (stored as list columns), not one number."""
