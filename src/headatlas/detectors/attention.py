"""Head detectors: pure functions from one layer's attention view to per-row scores.

A detector takes an :class:`~headatlas.capture.views.AttentionView` (one layer, a block of query
rows; it answers ``A[i, i-d]``, ``A[i, key]`` and row entropy exactly) and a :class:`Context`
describing the batch, and returns ``{score_name: Score}``, where ``Score.values`` holds one value
per (batch, head, query row) and ``Score.valid [batch, query]`` says which rows count. Scan
averages values over valid rows of a whole battery. Detectors never mutate their inputs, never
touch the model, and are registered in the explicit :data:`DETECTORS` dict.

Where we differ from TransformerLens' ``head_detector``: scores are per row (so mean, std and
count are reported), the first token of a causal sequence is excluded (its row is forced to
``A[0, 0] = 1``), and left padding is handled through logical positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..capture.views import AttentionView
from ..core.scores import LOCAL_WINDOW, MAX_OFFSET, VECTOR_SCORES


@dataclass(frozen=True)
class Context:
    """What detectors know about the batch (all ``[batch, key]`` tensors use the key axis).

    Attributes:
        positions: logical position of each token (0 = first real token, -1 = padding).
        word_ids: word index of each token, unique within a sequence (-1 = none).
        period: length P of the repeated segment (``repeat`` battery), else ``None``.
        repeat_start: logical position where the first copy of the repeated segment starts.
        window: local window width w.
        max_offset: number of offsets 0..max_offset-1 in the distance profile; also the
            farthest word piece the subword score looks at.
    """

    positions: torch.Tensor
    word_ids: torch.Tensor | None = None
    period: int | None = None
    repeat_start: int = 1
    window: int = LOCAL_WINDOW
    max_offset: int = MAX_OFFSET

    def q_positions(self, view: AttentionView) -> torch.Tensor:
        """Logical positions of the view's query rows, ``[batch, query]``."""
        return self.positions[:, view.q_index]


@dataclass(frozen=True)
class Score:
    """Per-row values of one score: ``values [batch, head, query(, offset)]``, ``valid [batch, query(, offset)]``."""

    values: torch.Tensor
    valid: torch.Tensor


Detector = Callable[[AttentionView, Context], dict[str, Score]]


def positional(view: AttentionView, ctx: Context) -> dict[str, Score]:
    """Positional scores (Clark et al. 2019, "What Does BERT Look At?"; Voita et al. 2019).

    - ``previous_token``: mean_i A[i, i-1] (TransformerLens previous-token pattern, "mul").
    - ``self``: mean_i A[i, i] (diagonal pattern).
    - ``first_token``: mean_i A[i, first real token] (the first token the model sees, BOS only
      where the tokenizer adds one) — the attention sink of Xiao et al. 2023
      ("Efficient Streaming Language Models with Attention Sinks"), vertical pattern.
    - ``local``: mean_i Σ_{i-w<j≤i} A[i, j], w = ``ctx.window`` (block pattern); rows with fewer
      than w earlier tokens are left out.

    Rows are queries at logical position ≥ 1. Returns values ``[batch, head, query]``, valid
    ``[batch, query]``.
    """
    pos = ctx.q_positions(view)  # [batch, query]
    ok = pos >= 1  # [batch, query]
    near = view.offsets(range(max(ctx.window, 2)))  # [batch, head, query, offset]
    first_idx = (ctx.positions == 0).float().argmax(dim=-1)  # [batch]
    return {
        "previous_token": Score(near[..., 1], ok),
        "self": Score(near[..., 0], ok),
        "first_token": Score(view.at_keys(first_idx), ok),
        "local": Score(near[..., : ctx.window].sum(-1), ok & (pos >= ctx.window - 1)),
    }


def entropy(view: AttentionView, ctx: Context) -> dict[str, Score]:
    """Attention entropy per row in nats, −Σ_j A log A, and normalised by log(number of allowed keys).

    Entropy of attention as a measure of head specialisation follows Clark et al. 2019 (who
    smooth A first; we use exact A with 0·log 0 = 0). Rows with fewer than 2 allowed keys are
    left out. Returns ``[batch, head, query]``.
    """
    ent = view.entropy()  # [batch, head, query]
    n = view.n_keys.to(ent.dtype)  # [batch, query]
    ok = (ctx.q_positions(view) >= 1) & (n >= 2)  # [batch, query]
    norm = ent / torch.log(n.clamp_min(2.0))[:, None, :]  # [batch, head, query]
    return {"entropy": Score(ent, ok), "entropy_norm": Score(norm, ok)}


def subword(view: AttentionView, ctx: Context) -> dict[str, Score]:
    """Subword score: on tokens that continue a word, the mass on the other (earlier) pieces of that word.

    A token continues a word when the previous token has the same word id (BPE pieces of one
    pre-tokenised word); pieces up to ``ctx.max_offset`` tokens back are counted, except the first
    token the model sees (the sink, which may be a piece of the first word when the tokenizer adds
    no BOS: attention parked there is not subword attention). Subword heads
    are described in Clark et al. 2019's analysis of split words. Returns ``[batch, head, query]``.
    """
    if ctx.word_ids is None:
        batch, n_query = view.n_keys.shape
        heads = view.offsets([0]).shape[1]
        empty = torch.zeros(batch, heads, n_query, device=view.n_keys.device)
        return {"subword": Score(empty, torch.zeros(batch, n_query, dtype=torch.bool, device=empty.device))}
    q_index = view.q_index  # [query]
    wid_q = ctx.word_ids[:, q_index]  # [batch, query]
    wid_prev = ctx.word_ids[:, (q_index - 1).clamp_min(0)]  # [batch, query]
    continues = (wid_q >= 0) & (wid_q == wid_prev) & (q_index >= 1)  # [batch, query]
    d = torch.arange(1, ctx.max_offset, device=q_index.device)  # [offset]
    keys = (q_index[:, None] - d[None, :]).clamp_min(0)  # [query, offset]
    same = (
        (ctx.word_ids[:, keys] == wid_q[:, :, None])
        & (q_index[:, None] - d[None, :] >= 0)
        & (ctx.positions[:, keys] >= 1)  # the first token the model sees is the sink, not a piece
    )  # [batch, query, offset]
    mass = (view.offsets(d.tolist()) * same[:, None]).sum(-1)  # [batch, head, query]
    return {"subword": Score(mass, continues)}


def distance(view: AttentionView, ctx: Context) -> dict[str, Score]:
    """Distance profile: mean attention mass at relative offset d = i − j, d = 0..max_offset−1.

    The positional-head view of Voita et al. 2019 / Clark et al. 2019 as a vector per head.
    Row i counts for offset d when the key i − d is a real token. Returns values ``[batch, head,
    query, offset]``, valid ``[batch, query, offset]``.
    """
    pos = ctx.q_positions(view)  # [batch, query]
    values = view.offsets(range(ctx.max_offset))  # [batch, head, query, offset]
    d = torch.arange(ctx.max_offset, device=pos.device)  # [offset]
    valid = (pos[..., None] >= d) & (pos[..., None] >= 1)  # [batch, query, offset]
    return {"distance_profile": Score(values, valid)}


def repeat(view: AttentionView, ctx: Context) -> dict[str, Score]:
    """Induction and duplicate-token scores on a sequence ``[BOS?, x, x]`` with ``|x| = P``.

    - ``induction``: mean A[i, i−P+1] over the second copy — attention to the token that followed
      the current token's earlier occurrence (Olsson et al. 2022, "In-context Learning and
      Induction Heads"; TransformerLens induction pattern, "mul" measure).
    - ``duplicate_token``: mean A[i, i−P] — attention to the earlier occurrence of the same token
      (Wang et al. 2022, "Interpretability in the Wild").

    Returns ``[batch, head, query]``.
    """
    if ctx.period is None:
        raise ValueError("the repeat detector needs ctx.period")
    period = ctx.period
    pos = ctx.q_positions(view)  # [batch, query]
    second = (pos >= ctx.repeat_start + period) & (pos < ctx.repeat_start + 2 * period)  # [batch, query]
    both = view.offsets([period - 1, period])  # [batch, head, query, 2]
    return {
        "induction": Score(both[..., 0], second),
        "duplicate_token": Score(both[..., 1], second),
    }


DETECTORS: dict[str, Detector] = {
    "positional": positional,
    "entropy": entropy,
    "subword": subword,
    "distance": distance,
    "repeat": repeat,
}
"""Every detector by name. Each returns the scores listed in :data:`DETECTOR_SCORES`, each of which
has its :class:`~headatlas.core.scores.ScoreSpec` (tested)."""

DETECTOR_SCORES: dict[str, tuple[str, ...]] = {
    "positional": ("previous_token", "self", "first_token", "local"),
    "entropy": ("entropy", "entropy_norm"),
    "subword": ("subword",),
    "distance": ("distance_profile",),
    "repeat": ("induction", "duplicate_token"),
}

__all__ = [
    "DETECTORS",
    "DETECTOR_SCORES",
    "LOCAL_WINDOW",
    "MAX_OFFSET",
    "VECTOR_SCORES",
    "Context",
    "Detector",
    "Score",
    "distance",
    "entropy",
    "positional",
    "repeat",
    "subword",
]
