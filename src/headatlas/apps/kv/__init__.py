"""Head-wise KV caches from the atlas: plans (:mod:`.plan`), a cache that really holds less
(:mod:`.cache`, attention in :mod:`headatlas.capture.backend_kv`), foreign formats
(:mod:`headatlas.apps.formats`) and the RULER-style tasks of ``kv eval`` (:mod:`.tasks`).

>>> plan = ha.kv.plan(atlas, keep_fraction=0.25)
>>> with ha.kv.compressed(loaded, plan) as cache:
...     loaded.model.generate(ids, past_key_values=cache, max_new_tokens=32)
...     cache.nbytes()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ...capture import backend_kv
from ...errors import HeadatlasError, param
from .cache import HeadwiseCache, HeadwiseLayer, plain_layers
from .plan import PRESETS, Plan, all_full, from_heads, kv_scores, plan

__all__ = [
    "PRESETS",
    "HeadwiseCache",
    "HeadwiseLayer",
    "Plan",
    "all_full",
    "build_cache",
    "compressed",
    "from_heads",
    "kv_scores",
    "layer_types",
    "plan",
    "prefill",
]


def layer_types(model: Any) -> list[str]:
    """``"global"`` or ``"sliding"`` per layer of ``model`` (its config's ``layer_types``)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    return ["sliding" if t == "sliding_attention" else "global" for t in types]


def _check_replaceable(loaded: Any) -> None:
    """Raise unless every attention layer of the model can take our backend and cache layers."""
    model = loaded.model
    if not loaded.info.causal:
        raise HeadatlasError(f"{loaded.info.name} is not a causal decoder: it has no KV cache to compress")
    if not getattr(model, "_supports_attention_backend", False):
        raise HeadatlasError(
            f"{loaded.info.name} ({loaded.info.arch}) does not take custom attention functions, so its "
            f"cache layers cannot be replaced: pass {param('fallback', 'fallback=True')} to use the plain cache"
        )
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if set(getattr(text, "layer_types", None) or ["full_attention"]) - {"full_attention", "sliding_attention"}:
        raise HeadatlasError(
            f"{loaded.info.name} has layer types {sorted(set(text.layer_types))} a head-wise cache cannot hold: "
            f"pass {param('fallback', 'fallback=True')} to use the plain cache"
        )


def build_cache(loaded: Any, kv_plan: Plan | None, *, streaming_prefill: bool = False) -> HeadwiseCache:
    """A :class:`HeadwiseCache` for ``kv_plan`` (``None``: transformers' plain dynamic layers)."""
    info = loaded.info
    if kv_plan is None:
        return HeadwiseCache(plain_layers(loaded.model.config))
    kv_plan.check_model(info)
    plain = plain_layers(loaded.model.config)
    layers: list[Any] = []
    for i, kind in enumerate(layer_types(loaded.model)):
        if kind == "sliding":
            layers.append(plain[i])  # the model's own window, left as it is
            continue
        layers.append(
            HeadwiseLayer(
                i,
                info.n_kv_heads,
                info.group_size,
                kv_plan.full_heads[i],
                kv_plan.sink,
                kv_plan.recent,
                kv_plan.compensate,
                streaming_prefill=streaming_prefill,
            )
        )
    return HeadwiseCache(layers)


@contextlib.contextmanager
def compressed(
    loaded: Any, kv_plan: Plan | None, *, streaming_prefill: bool = False, fallback: bool = False
) -> Iterator[HeadwiseCache]:
    """Yield a fresh head-wise cache for ``kv_plan`` with the model switched to the
    ``headatlas_kv`` attention backend; restore the model's backend on exit.

    ``streaming_prefill``: streaming heads see only sink + window keys during the prompt too
    (DuoAttention) instead of the full prompt compressed afterwards (kvpress). ``fallback``: on a
    model whose cache layers cannot be replaced, yield the plain cache instead of raising.
    """
    try:
        _check_replaceable(loaded)
    except HeadatlasError:
        if not fallback:
            raise
        yield HeadwiseCache(plain_layers(loaded.model.config))
        return
    cache = build_cache(loaded, kv_plan, streaming_prefill=streaming_prefill)
    backend_kv.register()
    model = loaded.model
    previous = model.config._attn_implementation
    model.set_attn_implementation(backend_kv.backend_name(model.config))
    try:
        yield cache
    finally:
        backend_kv.PENDING.set(None)
        model.set_attn_implementation(previous)


def prefill(
    loaded: Any,
    cache: HeadwiseCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk: int = 512,
) -> torch.Tensor:
    """Run the prompt (all but its last token) through ``cache`` in chunks of ``chunk`` tokens;
    return the last chunk's logits ``[batch, query, vocab]``. ``model.generate`` on the whole
    prompt then continues from the cache. With ``streaming_prefill`` caches this is DuoAttention's
    chunked prefill: streaming heads never attend beyond sink + window."""
    if chunk < 1:
        raise HeadatlasError(f"{param('chunk')} must be positive, got {chunk}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # [batch, seq]
    logits = torch.empty(0)
    end = input_ids.shape[1] - 1
    with torch.no_grad():
        for start in range(0, end, chunk):
            stop = min(start + chunk, end)
            out = loaded.model(
                input_ids=input_ids[:, start:stop],
                attention_mask=attention_mask[:, :stop],
                position_ids=positions[:, start:stop],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits
    return logits
