"""The ``headatlas_kv`` attention backend: attention over a head-wise KV cache with ragged lengths.

A head-wise cache layer (``headatlas.apps.kv.cache.HeadwiseLayer``) keeps every token for its
*full* KV heads and only ``sink`` first + ``recent`` last tokens (and optionally a compensation
token) for its *streaming* heads, so the two groups have different key lengths and cannot share
one ``[batch, kv_head, key, d_head]`` tensor or one mask. transformers calls ``cache.update``
right before the attention function of the same layer; the layer's ``update`` returns the full
heads' keys and values and announces itself in :data:`PENDING`. This backend then

- runs the full heads' query groups through transformers' SDPA function with the model's mask
  (so an all-full plan gives exactly the plain cache's output);
- asks the layer for the streaming heads' keys, values and their own ``[batch, query, key]`` mask
  (:meth:`streaming_keys`), runs fused SDPA with grouped-query broadcasting, and lets the layer
  store the new tokens (:meth:`commit`);
- writes both into one ``[batch, query, head, d_head]`` output, the layout every backend returns.

Layers without a pending head-wise layer (Gemma 3's sliding layers, or a plain cache) are
delegated to SDPA, or to the model's eager function where SDPA cannot express the attention.
The layer object is duck-typed (``layer_idx``, ``n_full``, ``n_stream``, ``full_q``, ``stream_q``,
``streaming_keys``, ``commit``; or ``groups`` of ``(kv heads, query heads, ring)`` whose rings have
those methods, for per-head windows), so capture does not import the apps stage.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F

from ....capture.backends.headatlas import _module_eager, has_sinks, needs_eager, register_backends

NAME = "headatlas_kv"
EAGER_NAME = "headatlas_kv_eager"

PENDING: ContextVar[Any] = ContextVar("headatlas_kv_pending", default=None)
"""The head-wise cache layer whose ``update`` ran last and whose attention is not computed yet."""


def real_tokens(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Return ``[batch, query]`` bool: which of the ``q_len`` new tokens are real (not padding).

    ``attention_mask`` is the model's 4-D mask ``[batch, 1, query, key]`` (bool: allowed; float:
    additive, 0 where allowed) or ``None`` (no padding). The last query row of a causal mask allows
    exactly the real keys up to itself, and the new tokens are the last ``q_len`` keys.
    """
    if attention_mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool)
    last = attention_mask[:, 0, -1, :kv_len]  # [batch, key]
    allowed = last if last.dtype == torch.bool else last == 0
    return allowed[:, kv_len - q_len :].expand(batch, q_len).cpu()


def _delegate(module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    if needs_eager(module.config) or has_sinks(module):
        return _module_eager(module)(module, *args, **kwargs)  # type: ignore[no-any-return]
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, *args, **kwargs)  # type: ignore[no-any-return]


def streaming_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of ``query [batch, head, query, d_head]`` over ``key``/``value [batch, kv_head, key, d_head]``
    where ``allowed [batch, query, key]`` (bool) says which keys each query sees; returns
    ``[batch, query, head, d_head]``. A query that sees no key (a padding row) attends to all keys,
    so no NaN appears (its output is never used)."""
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # [batch, query, key]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed[:, None].to(query.device), scale=scale, enable_gqa=True
    )  # [batch, head, query, d_head]
    return out.transpose(1, 2)


def kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"headatlas_kv"`` backend (see the module docstring).

    Shapes: ``query [batch, head, query, d_head]``; ``key``/``value`` are the full KV heads'
    ``[batch, n_full, key, d_head]`` when a head-wise layer is pending, else all KV heads'.
    Returns ``([batch, query, head, d_head], None)``.
    """
    layer = PENDING.get()
    if layer is None or layer.layer_idx != getattr(module, "layer_idx", None):
        out, _ = _delegate(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        return out, None
    PENDING.set(None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    batch, n_heads, q_len, _ = query.shape
    if layer.n_stream == 0:
        out, _ = _delegate(
            module, query, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs
        )
        return out, None
    out = query.new_empty(batch, q_len, n_heads, value.shape[-1])  # [batch, query, head, d_head]
    if layer.n_full:
        q_full = query.index_select(1, layer.full_q.to(query.device))  # [batch, n_full*g, query, d_head]
        o_full, _ = _delegate(
            module, q_full, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs
        )  # [batch, query, n_full*g, d_head]
        out[:, :, layer.full_q] = o_full.to(out.dtype)
    real = real_tokens(attention_mask, batch, q_len, key.shape[-2])  # [batch, query]
    groups = getattr(layer, "groups", None) or [
        (None, layer.stream_q, layer)
    ]  # per-head windows: one ring each
    for _, stream_q, ring in groups:
        s_key, s_value, allowed = ring.streaming_keys(real)  # [batch, n, S, d], ..., [batch, query, S]
        q_stream = query.index_select(1, stream_q.to(query.device))  # [batch, n*g, query, d_head]
        out[:, :, stream_q] = streaming_attention(q_stream, s_key, s_value, allowed, scale).to(out.dtype)
        ring.commit(real)
    return out, None


def register() -> None:
    """Register the backend with transformers' ``AttentionInterface`` and its mask functions (idempotent)."""
    register_backends(NAME, kv_attention, EAGER_NAME, kv_attention)


def backend_name(target: Any) -> str:
    """The backend name for a model (or its config): the eager-mask variant where SDPA cannot
    express the model (soft-capping, learned sinks)."""
    return EAGER_NAME if needs_eager(target) else NAME
