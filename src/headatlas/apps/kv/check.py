"""Does the head-wise KV cache work on this model? (``headatlas doctor``, the conformance sweep.)

A plan that keeps every KV head full must reproduce the plain cache exactly: prefill a prompt,
decode a few tokens greedily one at a time, and compare every step's logits with transformers'
own ``DynamicCache``; a plan with half the KV heads of every global layer streaming must then run too.
"""

from __future__ import annotations

from typing import Any

import torch

from ...model.compat import cache_kwargs, output_cache
from .plan import all_full, from_heads

STEPS = 3
"""Tokens decoded after the prompt."""


def _decode(loaded: Any, ids: torch.Tensor, cache: Any) -> list[torch.Tensor]:
    """Greedy decode of :data:`STEPS` tokens after ``ids [1, seq]`` through ``cache``; the logits
    ``[1, vocab]`` of the prompt's last position and of every decoded token."""
    model = loaded.model
    out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    steps = [out.logits[:, -1].float()]
    cache = output_cache(out) or cache
    position = ids.shape[1]
    for _ in range(STEPS):
        token = steps[-1].argmax(-1, keepdim=True)  # [1, 1]
        out = model(
            input_ids=token,
            position_ids=torch.tensor([[position]]),
            **cache_kwargs(model, cache),
            use_cache=True,
        )
        cache = output_cache(out) or cache
        steps.append(out.logits[:, -1].float())
        position += 1
    return steps


def cache_delta(loaded: Any, ids: torch.Tensor) -> float:
    """Return the max |Δ| of the logits between the all-full head-wise cache and the plain cache over
    a prompt ``ids [1, seq]`` and :data:`STEPS` greedy tokens, after checking that a plan with half
    the KV heads streaming runs. Raises :class:`~headatlas.core.errors.HeadatlasError` where head-wise
    caches are refused (encoder-only or encoder–decoder models, models that cannot swap attention)."""
    from transformers import DynamicCache

    from . import compressed, layer_types

    info = loaded.info
    with torch.no_grad():
        with compressed(loaded, all_full(info, sink=1, recent=4)) as cache:
            headwise = _decode(loaded, ids, cache)
        plain = _decode(loaded, ids, DynamicCache(config=loaded.model.config))
        every, some = list(range(info.n_kv_heads)), list(range(info.n_kv_heads // 2 or 1))
        half = [every if kind == "sliding" else some for kind in layer_types(loaded.model)]
        with compressed(loaded, from_heads(info, half, sink=1, recent=4)) as cache:
            _decode(loaded, ids, cache)
    return max(float((a - b).abs().max()) for a, b in zip(headwise, plain, strict=True))
