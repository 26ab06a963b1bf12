"""The ``headatlas_moa`` attention backend: MoA's profile of how much each span rule costs each head.

Fu et al. 2024 ("MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression") score a sparse mask on a head by the first-order change of the loss when the
attention entries it drops are removed. Relax the mask to ``m ∈ [0, 1]`` on the softmax's
numerator, ``A_ij = m_ij e_ij / Σ_k m_ik e_ik``; at ``m = 1``, ``∂L/∂m_ij = A_ij (G_ij − Σ_k G_ik
A_ik)`` with ``G = ∂L/∂A``, so dropping a set ``D`` of entries (``m: 1 → 0``) changes the loss by
about ``−Σ_{(i,j)∈D} A_ij (G_ij − Σ_k G_ik A_ik)``. This backend computes attention eagerly,
keeps ``A`` in the autograd graph, and a gradient hook on ``A`` adds that estimate per query head
and rule to the active :class:`Profile` (:data:`ACTIVE_PROFILE`); the forward also adds the
training-free alternative, the attention mass outside each rule's keys on the rows that matter.
A rule's dropped set is every causal key outside the first ``sink`` tokens and the last
``window`` keys up to the query. Without an active profile it is plain eager attention.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ....capture.backends.headatlas import register_backends
from ....capture.probs import allowed_keys

NAME = "headatlas_moa"
EAGER_NAME = "headatlas_moa_eager"


@dataclass
class Profile:
    """Per layer, ``grad [head, rule]`` (MoA's loss estimate) and ``mass [head, rule]`` (attention
    mass outside the rule's keys, mean over ``rows``), summed over the prompts run while active."""

    windows: list[int]
    sink: int
    rows: slice = field(default_factory=lambda: slice(None))
    grad: dict[int, torch.Tensor] = field(default_factory=dict)
    mass: dict[int, torch.Tensor] = field(default_factory=dict)
    _drops: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def dropped(self, n_query: int, n_key: int, device: torch.device) -> torch.Tensor:
        """``[rule, query * key]`` float: 1 where a rule drops the key (causal, not a sink, outside
        the window); one tensor per shape, shared by every layer."""
        where = (n_query, n_key, str(device))
        if where not in self._drops:
            self._drops = {where: self._dropped(n_query, n_key, device)}
        return self._drops[where]

    def _dropped(self, n_query: int, n_key: int, device: torch.device) -> torch.Tensor:
        i = torch.arange(n_key - n_query, n_key, device=device)[:, None]  # [query, 1] absolute positions
        j = torch.arange(n_key, device=device)[None, :]  # [1, key]
        w = torch.tensor(self.windows, device=device)[:, None, None]  # [rule, 1, 1]
        drop = (j <= i) & (j >= self.sink) & ((i - j) >= w)  # [rule, query, key]
        return drop.reshape(len(self.windows), -1).float()

    def add(self, store: dict[int, torch.Tensor], layer: int, value: torch.Tensor) -> None:
        """Add ``value [head, rule]`` to layer ``layer`` of ``store``."""
        store[layer] = store[layer] + value if layer in store else value


ACTIVE_PROFILE: ContextVar[Profile | None] = ContextVar("headatlas_moa_profile", default=None)


def _take_grad(
    profile: Profile, layer: int, probs: torch.Tensor, drop: torch.Tensor, grad: torch.Tensor
) -> None:
    """Gradient hook on ``A [batch, head, query, key]``: add MoA's loss estimate per head and rule."""
    influence = probs * (grad - (grad * probs).sum(-1, keepdim=True))  # [batch, head, query, key] = ∂L/∂m
    flat = influence.sum(0).reshape(influence.shape[1], -1)  # [head, query * key]
    profile.add(profile.grad, layer, -(flat @ drop.T).detach().cpu())  # [head, rule]


def moa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Eager attention: ``query [batch, head, query, d]``, ``key``/``value [batch, kv_head, key, d]``;
    returns ``([batch, query, head, d], None)``, profiling while a :class:`Profile` is active."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)  # [batch, head, key, d]
    v = value.repeat_interleave(group, dim=1)  # [batch, head, key, d]
    batch, heads, n_query, _ = query.shape
    allowed = allowed_keys(attention_mask, batch, n_query, k.shape[2], True, query.device)  # [batch, 1, q, k]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = (query @ k.transpose(-1, -2)) * scale  # [batch, head, query, key]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)  # [batch, head, query, key]
    profile = ACTIVE_PROFILE.get()
    if profile is not None:
        layer: int = getattr(module, "layer_idx")  # noqa: B009 (an attention module attribute)
        drop = profile.dropped(n_query, k.shape[2], query.device).to(probs.dtype)  # [rule, query * key]
        rows = torch.zeros(n_query, 1, dtype=probs.dtype, device=query.device)
        rows[profile.rows] = 1.0
        picked = (probs.detach() * rows).sum(0).reshape(heads, -1)  # [head, query * key]
        n_rows = max(1.0, float(rows.sum()) * batch)
        profile.add(profile.mass, layer, (picked @ drop.T).cpu() / n_rows)  # [head, rule]
        if probs.requires_grad:
            probs.register_hook(partial(_take_grad, profile, layer, probs.detach(), drop))
    out = probs @ v  # [batch, head, query, d]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the backend (and an eager-mask twin) with transformers; idempotent."""
    register_backends(NAME, moa_attention, EAGER_NAME, moa_attention)
