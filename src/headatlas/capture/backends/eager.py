"""Fallback backend: eager ``output_attentions`` for models that cannot swap attention functions.

This is what TransformerLens-free tools do today: transformers returns every layer's
``[batch, head, query, key]`` probabilities at once, so memory grows with L × H × T². headatlas
only uses it when ``_supports_attention_backend`` is false, and says so in a logged warning.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ...core.errors import HeadatlasError
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
    entropy) are the real keys some head of the layer gives nonzero probability: a mask is the same
    for every head of a layer and a masked key's probability is exactly 0, so sliding windows, local
    layers (GPT-Neo) and bidirectional encoders count right whatever ``causal`` says (kept for
    callers; the maps themselves decide). Raises :class:`HeadatlasError` for maps that are not
    ``[batch, head, seq, seq]`` (local or pooled attention: Longformer, Funnel).
    """
    seq = attention_mask.shape[1]
    key_ok = attention_mask.bool()[:, None, :]  # [batch, 1, key]
    numbers = list(range(len(attentions))) if layers is None else layers
    for layer, probs in zip(numbers, attentions, strict=True):
        if probs.dim() != 4 or tuple(probs.shape[-2:]) != (seq, seq):
            raise HeadatlasError(
                f"layer {layer}'s eager attention is {tuple(probs.shape)}, not [batch, head, {seq}, {seq}]: "
                "this model's attention is local or pooled, not one probability per query and key; capture refused"
            )
        on_padding = (probs.float() * ~key_ok[:, None]).sum(-1) * attention_mask[
            :, None, :
        ]  # [batch, head, query]
        if float(on_padding.max()) > 1e-6:
            raise HeadatlasError(
                f"layer {layer} gives attention to padding tokens (the model does not apply the attention "
                "mask as transformers' eager attention does): scores of padded batches would be wrong; capture refused"
            )
        seen = (probs > 0).any(dim=1) & key_ok  # [batch, query, key]
        yield DenseView(layer, probs.float(), 0, seen.sum(-1))
