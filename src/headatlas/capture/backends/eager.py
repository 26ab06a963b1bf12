"""Fallback backend: eager ``output_attentions`` for models that cannot swap attention functions.

This is what TransformerLens-free tools do today: transformers returns every layer's
``[batch, head, query, key]`` probabilities at once, so memory grows with L × H × T². headatlas
only uses it when ``_supports_attention_backend`` is false, and says so in a logged warning.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..views import DenseView


def views(
    attentions: tuple[torch.Tensor, ...],
    attention_mask: torch.Tensor,
    causal: bool,
    layers: list[int] | None = None,
) -> Iterator[DenseView]:
    """Yield one :class:`DenseView` per layer of eager ``attentions`` (each ``[batch, head, query, key]``),
    numbered ``layers`` (default ``0, 1, …``; a hybrid stack's attention layers are not contiguous).

    ``attention_mask [batch, seq]`` marks real tokens. Allowed-key counts (for normalised
    entropy) are the keys some head of the layer gives nonzero probability (a mask is the same for
    every head of a layer, and a masked key's probability is exactly 0), within the plain causal or
    full pattern: sliding windows and local layers (GPT-Neo, Mistral) count right.
    """
    seq = attention_mask.shape[1]
    key_ok = attention_mask.bool()[:, None, :]  # [batch, 1, key]
    if causal:
        tri = torch.ones(seq, seq, dtype=torch.bool, device=key_ok.device).tril()  # [query, key]
        allowed = tri[None] & key_ok  # [batch, query, key]
    else:
        allowed = key_ok.expand(-1, seq, -1)  # [batch, query, key]
    numbers = list(range(len(attentions))) if layers is None else layers
    for layer, probs in zip(numbers, attentions, strict=True):
        seen = (probs > 0).any(dim=1) & allowed  # [batch, query, key]
        yield DenseView(layer, probs.float(), 0, seen.sum(-1))
