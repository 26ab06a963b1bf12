"""Head-wise KV caches from the atlas: plans (:mod:`.plan`), a cache that really holds less
(:mod:`.cache`, attention in :mod:`headatlas.apps.kv.backends.headwise`), foreign formats
(:mod:`headatlas.apps.common.formats`) and the RULER-style tasks of ``kv eval`` (:mod:`.tasks`).

>>> plan = ha.kv.plan(atlas, keep_fraction=0.25)
>>> with ha.kv.compressed(loaded, plan) as cache:
...     loaded.model.generate(ids, **ha.kv.cache_kwargs(loaded.model, cache), max_new_tokens=32)
...     cache.nbytes()
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.errors import HeadatlasError, param
from ...core.outputs import Folder, check_output_folder
from ...model.compat import attention_implementation, cache_kwargs
from ..common.formats import DUO_CONFIG, DUO_FOLDER, DUO_TSV, check_format, read_duo, write_duo, write_headkv
from .backends import headwise as backend_kv
from .cache import HeadwiseCache, HeadwiseLayer, SpanLayer, plain_layers
from .plan import PRESETS, Plan, all_full, from_heads, head_scores, kv_scores, plan

__all__ = [
    "PRESETS",
    "HeadwiseCache",
    "HeadwiseLayer",
    "Plan",
    "SpanLayer",
    "all_full",
    "build_cache",
    "cache_kwargs",
    "check_export_target",
    "compressed",
    "export",
    "fill_from",
    "from_heads",
    "head_scores",
    "kv_scores",
    "layer_types",
    "plan",
    "plan_from_duo",
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
    reason = _kv_refusal(model, text)
    if reason is not None:
        raise HeadatlasError(
            f"{loaded.info.name} ({loaded.info.arch}): {reason}, so a head-wise cache cannot hold it: "
            f"pass {param('fallback', 'fallback=True')} to use the plain cache"
        )
    if set(getattr(text, "layer_types", None) or ["full_attention"]) - {
        "full_attention",
        "sliding_attention",
    }:
        raise HeadatlasError(
            f"{loaded.info.name} has layer types {sorted(set(text.layer_types))} a head-wise cache cannot hold: "
            f"pass {param('fallback', 'fallback=True')} to use the plain cache"
        )


def _kv_refusal(model: Any, text: Any) -> str | None:
    """Why the head-wise cache cannot serve this model (found by the conformance sweep), or ``None``."""
    from ...capture.backends.headatlas import has_sinks
    from ...model.archs import arch_spec

    spec = arch_spec(str(text.model_type))
    if spec.refused or spec.kv_refused:
        return spec.refused or spec.kv_refused
    if getattr(text, "kv_lora_rank", None) is not None or isinstance(getattr(text, "v_head_dim", None), int):
        return "multi-head latent attention (keys and values of different sizes, a compressed cache)"
    if any(has_sinks(m) for m in model.modules()):
        return "learned attention sinks, which the head-wise cache's attention does not apply"
    return None


def fill_from(cache: HeadwiseCache, source: Any, attention_mask: torch.Tensor | None = None) -> HeadwiseCache:
    """Fill an empty head-wise ``cache`` from a prefilled plain ``source`` cache (full attention, then
    compressed: kvpress's way); ``attention_mask [batch, seq]`` marks real tokens. Returns ``cache``."""
    for i, (src, dst) in enumerate(zip(source.layers, cache.layers, strict=True)):
        if not isinstance(dst, HeadwiseLayer | SpanLayer):
            cache.layers[i] = copy.deepcopy(src)  # the model's own sliding window
            continue
        keys, values = src.keys, src.values  # [batch, kv_head, seq, d_head]
        real = (
            torch.ones(keys.shape[0], keys.shape[-2], dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool().cpu()
        )
        dst.update(keys, values)
        if isinstance(dst, SpanLayer):
            dst.compress(real)
        elif dst.n_stream:
            dst.streaming_keys(real)
            dst.commit(real)
    backend_kv.PENDING.set(None)
    return cache


def _check_sliding(kv_plan: Plan, types: list[str], n_kv_heads: int) -> None:
    """Refuse a plan that streams heads of a layer the model keeps as its own sliding window (a
    plan made without the model's layer types: it would silently hold more than it says)."""
    bad = [i for i, kind in enumerate(types) if kind == "sliding" and len(kv_plan.full_heads[i]) < n_kv_heads]
    if bad:
        raise HeadatlasError(
            f"the KV plan streams heads of layer {bad[0]}, a sliding-window layer of this model "
            f"({len(bad)} such layers): make it with the model's layer types (`headatlas kv plan ... --model "
            "MODEL`, or `kv.plan(..., layer_types=kv.layer_types(model))`) so those layers stay as they are"
        )


def build_cache(
    loaded: Any, kv_plan: Plan | None, *, streaming_prefill: bool = False, length: int | None = None
) -> HeadwiseCache:
    """A :class:`HeadwiseCache` for ``kv_plan`` (``None``: transformers' plain dynamic layers).

    A plan with per-head spans (MoA) gets one :class:`SpanLayer` per global layer, its windows
    resolved at ``length`` prompt tokens (default: the plan's ``context``)."""
    info = loaded.info
    if kv_plan is None:
        return HeadwiseCache(plain_layers(loaded.model.config))
    kv_plan.check_model(info)
    plain = plain_layers(loaded.model.config)
    types = layer_types(loaded.model)
    _check_sliding(kv_plan, types, info.n_kv_heads)
    layers: list[Any] = []
    windows = kv_plan.windows(length or kv_plan.context) if kv_plan.spans else None
    for i, kind in enumerate(types):
        if kind == "sliding":
            layers.append(plain[i])  # the model's own window, left as it is
            continue
        if windows is not None:
            layers.append(
                SpanLayer(i, info.group_size, windows[i], kv_plan.sink, kv_plan.compensate, streaming_prefill)
            )
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
    loaded: Any,
    kv_plan: Plan | None,
    *,
    streaming_prefill: bool = False,
    fallback: bool = False,
    source: Any = None,
    attention_mask: torch.Tensor | None = None,
    length: int | None = None,
) -> Iterator[HeadwiseCache]:
    """Yield a fresh head-wise cache for ``kv_plan`` with the model switched to the
    ``headatlas_kv`` attention backend; restore the model's backend on exit.

    ``streaming_prefill``: streaming heads see only sink + window keys during the prompt too
    (DuoAttention) instead of the full prompt compressed afterwards (kvpress). ``fallback``: on a
    model whose cache layers cannot be replaced, yield the plain cache instead of raising.
    ``source``: a prefilled plain cache (``attention_mask`` its real tokens) to compress into the
    new cache (:func:`fill_from`), so one full prefill serves several plans. ``length``: the prompt
    tokens a span plan's windows are resolved at (default: ``source``'s length, else the plan's
    ``context``).
    """
    loaded.info.require_one_stack("head-wise KV caches")
    try:
        _check_replaceable(loaded)
    except HeadatlasError:
        if not fallback:
            raise
        yield HeadwiseCache(plain_layers(loaded.model.config))
        return
    if length is None and source is not None:
        length = source.get_seq_length()
    cache = build_cache(loaded, kv_plan, streaming_prefill=streaming_prefill, length=length)
    if source is not None:
        fill_from(cache, source, attention_mask)
    backend_kv.register()
    model = loaded.model
    with attention_implementation(model, backend_kv.backend_name(model)):
        try:
            yield cache
        finally:
            backend_kv.PENDING.set(None)


def prefill(
    loaded: Any,
    cache: HeadwiseCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk: int = 512,
) -> torch.Tensor:
    """Run the prompt (all but its last token) through ``cache`` in chunks of ``chunk`` tokens;
    return the logits at the last prefilled position ``[batch, 1, vocab]`` (only that row is
    computed: at 4096 tokens all rows of Gemma 3's 262k vocabulary would be 4 GiB). ``model.generate`` on the whole
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
                **cache_kwargs(loaded.model, cache),
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits
    return logits


HEADKV_FILE = "head_scores.json"


HEADKV_FOLDER = Folder("kv export --format headkv", HEADKV_FILE)


def check_export_target(fmt: str, out: str | Path, force: bool = False) -> None:
    """Raise :class:`HeadatlasError` unless ``kv export --format fmt`` may write the folder ``out``,
    before any work (never a model's directory: a DuoAttention pattern has its own ``config.json``)."""
    spec = check_format(fmt)
    check_output_folder(out, DUO_FOLDER if spec.name == "duo" else HEADKV_FOLDER, force)


def export(kv_plan: Plan, fmt: str, out: str | Path) -> list[Path]:
    """Write ``kv_plan`` in a foreign format into directory ``out``; return the files written.

    ``duo``: DuoAttention's ``full_attention_heads.tsv`` (1.0 = full KV head, 0.0 = streaming) and
    ``config.json`` (sink and recent sizes), read by duo-attention and kvpress's DuoAttentionPress.
    ``headkv``: ``head_scores.json`` ``{"L-H": [score]}`` per query head, the plan's ranking scores,
    read by Retrieval_Head and HeadKV.
    """
    spec = check_format(fmt)
    where = Path(out)
    if spec.name == "duo":
        if kv_plan.spans:
            raise HeadatlasError(
                "a plan with per-head spans (MoA) has no DuoAttention pattern (one window for every "
                "streaming head): export a binary plan"
            )
        gates = np.zeros((len(kv_plan.full_heads), kv_plan.n_kv_heads))  # [layer, kv_head]
        for layer, heads in enumerate(kv_plan.full_heads):
            gates[layer, heads] = 1.0
        write_duo(where, gates, kv_plan.sink, kv_plan.recent)
        return [where / DUO_TSV, where / DUO_CONFIG]
    if not kv_plan.head_scores:
        raise HeadatlasError(
            "this plan has no per-head scores (it was not made from an atlas): use --format duo"
        )
    return [write_headkv(where / HEADKV_FILE, np.asarray(kv_plan.head_scores))]


def plan_from_duo(info: Any, directory: str | Path, threshold: float = 0.5) -> Plan:
    """A :class:`Plan` from a DuoAttention pattern directory: KV heads whose gate is ≥ ``threshold``
    keep full KV; sink and recent sizes from its ``config.json``."""
    pattern = read_duo(directory)
    if pattern.gates.shape != (info.n_layers, info.n_kv_heads):
        raise HeadatlasError(
            f"the DuoAttention pattern is {pattern.gates.shape[0]} layers × {pattern.gates.shape[1]} KV heads, "
            f"the model {info.n_layers} × {info.n_kv_heads}"
        )
    return from_heads(
        info,
        pattern.full_heads(threshold),
        sink=pattern.sink,
        recent=pattern.recent,
        rule={"by": ["duo-pattern"], "source": str(directory), "threshold": threshold},
    )
