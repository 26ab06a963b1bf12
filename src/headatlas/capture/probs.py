"""Exact attention probabilities for one layer, a block of query rows at a time.

These functions reproduce what a transformers attention backend computes (scaling, GQA
grouping, soft-capping, attention sinks, boolean or additive masks, sliding windows carried by
the mask) so the statistics headatlas reports are the model's own attention, not a re-derivation.
"""

from __future__ import annotations

import torch

# Largest number of fp32 elements one probability block may hold (≈ 256 MB).
MAX_BLOCK_ELEMENTS = 1 << 26


def allowed_keys(
    mask: torch.Tensor | None,
    batch: int,
    n_query: int,
    n_key: int,
    causal: bool,
    device: torch.device,
) -> torch.Tensor:
    """Return which keys each query may attend to, as bool ``[batch, 1, query, key]``.

    ``mask`` is what the model passed to its attention function: a boolean mask (``True`` =
    attend, as built by transformers' ``sdpa_mask``), an additive float mask (0 = attend, a very
    negative value = blocked), or ``None``, which means plain causal attention (queries aligned to
    the last keys) for decoders and full attention for encoders.
    """
    if mask is None:
        if not causal or n_query == 1:
            return torch.ones(batch, 1, n_query, n_key, dtype=torch.bool, device=device)
        q_idx = torch.arange(n_query, device=device)[:, None] + (n_key - n_query)  # [query, 1]
        k_idx = torch.arange(n_key, device=device)[None, :]  # [1, key]
        return (k_idx <= q_idx).expand(batch, 1, n_query, n_key)
    # boolean: True keeps; additive: 0 keeps, a very negative value blocks
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed[..., :n_key]
    return allowed.expand(batch, allowed.shape[1], n_query, n_key)


def block_rows(batch: int, n_heads: int, n_query: int, n_key: int) -> int:
    """Return how many query rows fit in one probability block of at most ``MAX_BLOCK_ELEMENTS``."""
    per_row = max(1, batch * n_heads * n_key)
    return max(1, min(n_query, MAX_BLOCK_ELEMENTS // per_row))


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return attention probabilities ``[batch, head, query, key]`` in fp32.

    Args:
        query: ``[batch, head, query, d_head]`` (after rotary embeddings).
        key: ``[batch, kv_head, key, d_head]``; query head ``h`` reads KV head
            ``h // (head // kv_head)`` (GQA/MQA), without materialising repeated keys.
        allowed: bool ``[batch, 1 | head, query, key]`` from :func:`allowed_keys`.
        scaling: the logit scale the model uses (usually ``d_head ** -0.5``).
        softcap: Gemma-2 style logit soft-capping ``cap * tanh(logit / cap)``, if the model uses it.
        sinks: per-head learned sink logits ``[head]`` (gpt-oss); they take probability mass but
            are not a key, so rows then sum to less than 1.
        bias: an additive logit bias ``[1 | batch, head, query, key]`` added after scaling (T5's
            relative position bias, which T5 does not scale).

    Rows with no allowed key (left-padding queries) are all zeros.
    """
    batch, n_heads, n_query, d_head = query.shape
    n_kv = key.shape[1]
    group = n_heads // n_kv
    q = query.float().reshape(batch, n_kv, group, n_query, d_head)  # [batch, kv_head, group, query, d_head]
    k = key.float().unsqueeze(2)  # [batch, kv_head, 1, key, d_head]
    logits = (q @ k.transpose(-1, -2)) * scaling  # [batch, kv_head, group, query, key]
    logits = logits.reshape(batch, n_heads, n_query, -1)  # [batch, head, query, key]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if bias is not None:
        logits = logits + bias.float()  # [batch, head, query, key]
    logits = logits.masked_fill(~allowed, float("-inf"))  # [batch, head, query, key]
    if sinks is not None:
        sink = sinks.float().reshape(1, n_heads, 1, 1).expand(batch, n_heads, n_query, 1)
        both = torch.cat([logits, sink], dim=-1)  # [batch, head, query, key + 1]
        probs = torch.softmax(both, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)  # [batch, head, query, key]
    return torch.nan_to_num(probs, nan=0.0)
