"""Token attention pooled to words: the one pooling every word-level score uses (syntactic heads,
cross-attention alignment). Clark et al. 2019, Section 4.1: attention *to* a word is the sum over
its pieces, attention *from* a word the mean over its pieces."""

from __future__ import annotations

import torch


def _members(word_ids: torch.Tensor, n_words: int, dtype: torch.dtype) -> torch.Tensor:
    """``[batch, token, word]`` one-hot membership; tokens with word id −1 belong to no word."""
    slots = torch.arange(n_words, device=word_ids.device)  # [word]
    return (word_ids[..., None] == slots).to(dtype)  # [batch, token, word]


def word_attention(
    probs: torch.Tensor,
    query_words: torch.Tensor,
    key_words: torch.Tensor | None = None,
    n_query_words: int | None = None,
    n_key_words: int | None = None,
) -> torch.Tensor:
    """Return word-to-word attention ``[batch, head, query word, key word]`` (Clark et al. 2019).

    Args:
        probs: ``[batch, head, query, key]`` attention rows.
        query_words: ``[batch, query]`` word index of each query token, −1 for none.
        key_words: ``[batch, key]`` word index of each key token (default: ``query_words``, self-attention).
        n_query_words, n_key_words: word slots on each axis (default: the largest id + 1).

    Returns:
        ``[batch, head, query word, key word]``: the mass on a key word is the sum over its tokens, a
        query word's row the mean of its tokens' rows; tokens with word id −1 (special tokens,
        sinks, padding) count on neither axis, and words with no token have zero rows.
    """
    keys = query_words if key_words is None else key_words
    n_q = n_query_words if n_query_words is not None else int(query_words.max().clamp_min(0)) + 1
    n_k = n_key_words if n_key_words is not None else int(keys.max().clamp_min(0)) + 1
    to_words = probs @ _members(keys, n_k, probs.dtype)[:, None]  # [batch, head, query, key word]
    rows = _members(query_words, n_q, probs.dtype)  # [batch, query, query word]
    rows = rows / rows.sum(1, keepdim=True).clamp_min(1.0)  # [batch, query, query word]: mean over pieces
    return rows.transpose(1, 2)[:, None] @ to_words  # [batch, head, query word, key word]
