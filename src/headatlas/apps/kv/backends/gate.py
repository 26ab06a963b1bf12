"""The ``headatlas_gate`` attention backend: DuoAttention's gated mix of full and streaming attention.

Xiao et al. 2024 ("DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
Heads") find retrieval heads by optimisation: each KV head gets a gate α ∈ [0, 1], its query
heads output ``α · full attention + (1 − α) · streaming attention`` (streaming: the first
``sink`` keys and the ``recent`` last ones), and only the gates are trained. This backend computes
that mix for every layer, with gradients to the gates, while a :class:`GateState` is active
(:data:`ACTIVE_GATES`); without one it is plain SDPA. Both attentions use fused SDPA on the
model's own (boolean, padding-aware) mask; the streaming mask adds the sink and window limits.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ....capture.backends.headatlas import register_backends
from ....capture.probs import allowed_keys

NAME = "headatlas_gate"
EAGER_NAME = "headatlas_gate_eager"


@dataclass
class GateState:
    """Gates ``alpha [layer, kv_head]`` (a trainable tensor) and the streaming pattern."""

    alpha: torch.Tensor
    sink: int
    recent: int


ACTIVE_GATES: ContextVar[GateState | None] = ContextVar("headatlas_gates", default=None)


def streaming_mask(allowed: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Restrict ``allowed [batch, 1, query, key]`` (causal, padding-aware) to the first ``sink``
    real keys and the ``recent`` keys up to each query; returns the same shape."""
    real = allowed.any(dim=2, keepdim=True)  # [batch, 1, 1, key]: keys some query may see
    rank = real.long().cumsum(-1) - 1  # [batch, 1, 1, key]: index among real keys
    n_query, n_key = allowed.shape[-2:]
    q_pos = torch.arange(n_key - n_query, n_key, device=allowed.device)[:, None]  # [query, 1]
    k_pos = torch.arange(n_key, device=allowed.device)[None, :]  # [1, key]
    near = (q_pos - k_pos) < recent  # [query, key]
    return allowed & ((rank < sink) | near)  # [batch, 1, query, key]


def gate_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention forward: ``query [batch, head, query, d]``, ``key``/``value [batch, kv_head,
    key, d]``; returns ``([batch, query, head, d], None)``, the gated mix when gates are active."""
    state = ACTIVE_GATES.get()
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)  # [batch, head, key, d]
    v = value.repeat_interleave(group, dim=1)  # [batch, head, key, d]
    batch, _heads, n_query, _ = query.shape
    allowed = allowed_keys(
        attention_mask, batch, n_query, k.shape[2], True, query.device
    )  # [batch, 1, query, key]
    full = F.scaled_dot_product_attention(
        query, k, v, attn_mask=allowed, scale=scaling
    )  # [batch, head, query, d]
    if state is None:
        return full.transpose(1, 2).contiguous(), None
    stream_allowed = streaming_mask(allowed, state.sink, state.recent)  # [batch, 1, query, key]
    stream = F.scaled_dot_product_attention(query, k, v, attn_mask=stream_allowed, scale=scaling)
    layer: int = getattr(module, "layer_idx")  # noqa: B009 (an attention module attribute)
    alpha = state.alpha[layer].repeat_interleave(group)  # [head]
    alpha = alpha.to(query.dtype)[None, :, None, None]  # [1, head, 1, 1]
    mixed = alpha * full + (1 - alpha) * stream  # [batch, head, query, d]
    return torch.nan_to_num(mixed).transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the backend (and an eager-mask twin) with transformers; idempotent."""
    register_backends(NAME, gate_attention, EAGER_NAME, gate_attention)
