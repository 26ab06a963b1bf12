"""What differs between the transformers releases the dependency range allows, in one place.

transformers 5.25 renamed the cache argument of ``forward`` / ``generate`` and the cache field of
model outputs from ``past_key_values`` to ``cache`` (the old name warns, and is removed in 5.40 for
``forward``). headatlas passes and reads the cache through these two functions, so every release
from the range's floor (5.20) on gets the name it expects and prints no deprecation warning.
:func:`attention_implementation` swaps a model's attention backend for a block and restores
every sub-model's own.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_TAKES_CACHE: dict[type, bool] = {}
"""Per model class: whether ``forward`` takes ``cache`` (read once: decoding calls this every token)."""


def _takes_cache(model: Any) -> bool:
    kind = type(model)
    if kind not in _TAKES_CACHE:
        _TAKES_CACHE[kind] = "cache" in inspect.signature(kind.forward).parameters
    return _TAKES_CACHE[kind]


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """Return ``{name: cache}`` with the name ``model``'s ``forward`` (and ``generate``) takes the
    KV cache under: ``cache`` on transformers >= 5.25, ``past_key_values`` before."""
    name = "cache" if _takes_cache(model) else "past_key_values"
    return {name: cache}


def output_cache(output: Any) -> Any:
    """Return the KV cache a model ``output`` carries (``cache`` on transformers >= 5.25,
    ``past_key_values`` before), or ``None``."""
    keys = output.keys() if hasattr(output, "keys") else ()
    if "cache" in keys:
        return output["cache"]
    return getattr(output, "past_key_values", None)


def _attention_configs(model: Any) -> list[Any]:
    """The model's config, every sub-model's and every sub-config, once each."""
    found: dict[int, Any] = {}
    pending = [model.config, *(getattr(m, "config", None) for m in model.modules())]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = config
        pending.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
    return list(found.values())


@contextmanager
def attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Run the block with ``model``'s attention implementation set to ``name`` (transformers'
    ``set_attn_implementation``), then put back what every config had: the top-level name alone
    would be pushed onto sub-models that had another one (VibeVoice's acoustic tokenizer is eager
    and refuses SDPA). Raises the ``ValueError`` of a sub-model that refuses ``name``, after
    restoring."""
    saved = [(config, config._attn_implementation_internal) for config in _attention_configs(model)]
    try:
        model.set_attn_implementation(name)
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation
