"""Cross-attention detectors: pure functions from one cross-attention view to per-row scores.

A decoder's cross-attention row ``i`` (the step that predicts target token ``i``) is a
distribution over the source tokens. Bahdanau et al. 2015 read it as a soft word alignment; this
module scores each head against that reading:

- ``diagonal``: the mass near the monotonic diagonal ``j/T_src ≈ i/T_tgt`` (no gold data needed);
- ``alignment``: with a gold word alignment, how often the source word a head attends to most is
  a gold link of the target word (argmax readout, as in Garg et al. 2019, "Jointly Learning to
  Align and Translate with Transformer Models");
- ``alignment_error``: the alignment error rate (AER) of Och & Ney 2003, "A Systematic
  Comparison of Various Statistical Alignment Models", of that argmax alignment;
- ``first_token``, ``entropy``, ``entropy_norm``: the positional scores that keep their meaning
  over a source (the sink on the first source token; how spread the row is).

Word-level readout: the attention of target word ``w`` is the mean of its tokens' rows, the mass
on source word ``v`` the sum over ``v``'s tokens, and each target word is linked to one source
word (its argmax). AER counts sure links ``S`` and possible links ``P ⊇ S``:
``AER = 1 − (|A∩S| + |A∩P|) / (|A| + |S|)``. So that the atlas's mean over rows *is* the corpus
AER, every predicted link and every sure link is one row: a predicted link's value is
``1 − [a∈S] − [a∈P]``, a sure link's value is 1 (the mean of those rows is exactly AER, and the
rows of several batches, processes or machines merge like any other score's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..capture.views import AttentionView, DenseView
from .attention import Score
from .words import word_attention

DIAGONAL_BAND = 0.1
"""Half-width of the ``diagonal`` band as a share of the source length (at least one token)."""


@dataclass(frozen=True)
class CrossContext:
    """What cross-attention detectors know about a batch of (source, target) pairs.

    Attributes:
        source_positions: ``[batch, source]`` logical position of each source token (−1 = padding).
        target_positions: ``[batch, target]`` position of each decoder row (−1 = padding).
        source_words: ``[batch, source]`` word id of each source token (−1 = none), or ``None``.
        target_words: ``[batch, target]`` word id of the token each decoder row predicts, or ``None``.
        sure: ``[batch, target word, source word]`` gold sure links, or ``None`` (no gold alignment).
        possible: ``[batch, target word, source word]`` gold possible links (⊇ ``sure``), or ``None``.
    """

    source_positions: torch.Tensor
    target_positions: torch.Tensor
    source_words: torch.Tensor | None = None
    target_words: torch.Tensor | None = None
    sure: torch.Tensor | None = None
    possible: torch.Tensor | None = None


def _rows(view: AttentionView, ctx: CrossContext) -> torch.Tensor:
    """Target positions of the view's rows, ``[batch, query]``."""
    return ctx.target_positions[:, view.q_index]


def cross_positional(view: AttentionView, ctx: CrossContext) -> dict[str, Score]:
    """``diagonal`` and ``first_token`` of a cross-attention view; values ``[batch, head, query]``.

    ``diagonal``: for target row ``i`` of a sequence with ``T`` real target rows and ``S`` real
    source tokens, the mass on source tokens within ``max(1, DIAGONAL_BAND·S)`` of the diagonal
    point ``(i + ½)·S/T − ½`` (positions counted among real tokens). A head that attends from
    target token ``i`` to source token ``i`` of equal-length pairs scores 1. ``first_token``: the
    mass on the first real source token (the attention sink of Xiao et al. 2023, over a source).
    """
    if not isinstance(view, DenseView):
        raise TypeError("cross-attention detectors read dense views")
    rows = _rows(view, ctx)  # [batch, query]
    ok = rows >= 0  # [batch, query]
    n_src = (ctx.source_positions >= 0).sum(-1).to(view.probs.dtype)  # [batch]
    n_tgt = (ctx.target_positions >= 0).sum(-1).to(view.probs.dtype)  # [batch]
    centre = (rows.to(view.probs.dtype) + 0.5) * (n_src / n_tgt.clamp_min(1))[:, None] - 0.5  # [batch, query]
    half = torch.clamp(DIAGONAL_BAND * n_src, min=1.0)  # [batch]
    src_pos = ctx.source_positions.to(view.probs.dtype)  # [batch, source]
    near = (src_pos[:, None, :] - centre[:, :, None]).abs() <= half[:, None, None]  # [batch, query, source]
    near = near & (ctx.source_positions >= 0)[:, None, :]  # [batch, query, source]
    diagonal = (view.probs * near[:, None]).sum(-1)  # [batch, head, query]
    first_idx = (ctx.source_positions == 0).float().argmax(dim=-1)  # [batch]
    return {"diagonal": Score(diagonal, ok), "first_token": Score(view.at_keys(first_idx), ok)}


def cross_entropy(view: AttentionView, ctx: CrossContext) -> dict[str, Score]:
    """Row entropy over the source in nats and divided by log(source length); ``[batch, head, query]``."""
    ent = view.entropy()  # [batch, head, query]
    n = view.n_keys.to(ent.dtype)  # [batch, query]
    ok = (_rows(view, ctx) >= 0) & (n >= 2)  # [batch, query]
    return {
        "entropy": Score(ent, ok),
        "entropy_norm": Score(ent / torch.log(n.clamp_min(2.0))[:, None, :], ok),
    }


def alignment(view: AttentionView, ctx: CrossContext) -> dict[str, Score]:
    """``alignment`` (argmax accuracy) and ``alignment_error`` (AER) against a gold alignment.

    ``alignment``: over target words with a sure link, whether the head's argmax source word is a
    possible link; values ``[batch, head, target word]``. ``alignment_error``: one row per
    predicted link and per sure link (module docstring), values ``[batch, head, tw + tw·sw]``.
    Returns ``{}`` without a gold alignment. The view must hold every row of its targets.
    """
    if ctx.sure is None or ctx.possible is None or ctx.source_words is None or ctx.target_words is None:
        return {}
    if not isinstance(view, DenseView):
        raise TypeError("cross-attention detectors read dense views")
    if view.q_index.shape[0] != ctx.target_positions.shape[1]:
        raise ValueError("alignment needs every target row in one view: use shorter pairs or smaller batches")
    sure, possible = ctx.sure, ctx.possible  # [batch, tw, sw]
    words = word_attention(view.probs, ctx.target_words, ctx.source_words)  # [batch, head, tw', sw']
    n_tw, n_sw = sure.shape[1], sure.shape[2]
    words = torch.nn.functional.pad(words, (0, n_sw - words.shape[3], 0, n_tw - words.shape[2]))
    pred = words.argmax(-1, keepdim=True)  # [batch, head, tw, 1]
    heads = words.shape[1]
    hit_sure = sure[:, None].expand(-1, heads, -1, -1).gather(-1, pred)[..., 0]  # [batch, head, tw]
    hit_possible = possible[:, None].expand(-1, heads, -1, -1).gather(-1, pred)[..., 0]  # [batch, head, tw]
    rows_of = torch.nn.functional.one_hot(ctx.target_words.clamp_min(0), n_tw)  # [batch, target, tw]
    has_word = (rows_of * (ctx.target_words >= 0)[..., None]).any(1)  # [batch, tw]: words with a row
    accuracy = Score(hit_possible.to(words.dtype), has_word & sure.any(-1))
    predicted = 1.0 - hit_sure.to(words.dtype) - hit_possible.to(words.dtype)  # [batch, head, tw]
    sure_rows = torch.ones(sure.shape[0], heads, n_tw * n_sw, dtype=words.dtype, device=words.device)
    aer = Score(
        torch.cat([predicted, sure_rows], dim=-1),  # [batch, head, tw + tw·sw]
        torch.cat([has_word, sure.reshape(sure.shape[0], -1)], dim=-1),  # [batch, tw + tw·sw]
    )
    return {"alignment": accuracy, "alignment_error": aer}


CrossDetector = Callable[[AttentionView, CrossContext], dict[str, Score]]

CROSS_DETECTORS: dict[str, CrossDetector] = {
    "cross_positional": cross_positional,
    "cross_entropy": cross_entropy,
    "alignment": alignment,
}
"""Every cross-attention detector by name; each score has its :class:`~headatlas.core.scores.ScoreSpec`."""

CROSS_DETECTOR_SCORES: dict[str, tuple[str, ...]] = {
    "cross_positional": ("diagonal", "first_token"),
    "cross_entropy": ("entropy", "entropy_norm"),
    "alignment": ("alignment", "alignment_error"),
}


def aer(predicted: set[tuple[int, int]], sure: set[tuple[int, int]], possible: set[tuple[int, int]]) -> float:
    """Return Och & Ney's alignment error rate of link set ``predicted`` against gold ``sure`` and
    ``possible`` links (``possible`` is taken as ``possible ∪ sure``): the reference formula the
    detector's rows reproduce."""
    possible = possible | sure
    if not predicted and not sure:
        return 0.0
    return 1.0 - (len(predicted & sure) + len(predicted & possible)) / (len(predicted) + len(sure))
