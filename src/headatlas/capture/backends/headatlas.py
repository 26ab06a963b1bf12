"""The ``headatlas`` attention backend for transformers' ``AttentionInterface``.

Registered under two names with the matching mask functions of ``AttentionMaskInterface``
(forgetting the mask registration makes transformers pass ``mask=None``, which silently drops
padding):

- ``"headatlas"``: output delegated to transformers' SDPA function, boolean ``sdpa_mask``.
- ``"headatlas_eager"``: for models whose attention SDPA cannot express (logit soft-capping,
  learned sinks); output delegated to the model's own ``eager_attention_forward``, additive mask.

When a :class:`~headatlas.capture.session.CaptureSession` is active, the query, key and value
tensors (after rotary embeddings, before GQA repetition) are handed to it: its ``on_qkv``
callback may read or replace them (path patching), and its views see them. On its fast path the session
computes the output itself with the same fused kernel SDPA uses on CPU (plus the log-sum-exp);
otherwise the output comes from the delegate. Model outputs equal the delegate backend's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from ...core.errors import HeadatlasError

if TYPE_CHECKING:
    from ..session import CaptureSession

NAME = "headatlas"
EAGER_NAME = "headatlas_eager"

ACTIVE_SESSION: ContextVar[CaptureSession | None] = ContextVar("headatlas_session", default=None)
_registered_names: set[str] = set()


def _module_eager(module: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    return fn  # type: ignore[no-any-return]


def _forward(
    use_eager: bool,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention forward: delegate the output, report ``query``/``key`` to the active session.

    Shapes: ``query [batch, head, query, d_head]``, ``key``/``value`` ``[batch, kv_head, key, d_head]``;
    returns ``([batch, query, head, d_head], None)`` like every transformers backend.
    """
    session = ACTIVE_SESSION.get()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kwargs.get("indices") is not None:  # DSA: the indexer's keys, as eager and SDPA apply them
        attention_mask = with_selected_keys(attention_mask, kwargs["indices"], key.shape[2], use_eager)
    if session is not None and kwargs.get("block_indices") is not None:
        raise HeadatlasError(
            f"{type(module).__name__}: block-sparse attention whose key blocks an indexer picks per query "
            "and head (MiniMax M3): a per-head key set is not one attention mask; capture refused"
        )
    if session is not None and session.on_qkv is not None:
        replaced = session.on_qkv(session.layer_of(module), query, key, value, session.context)
        if replaced is not None:
            query, key, value = replaced
    sinks = kwargs.get("s_aux")
    # The eager delegate exists for sinks or soft-capping; layers of a sink family (``sinks``
    # attribute, a parameter or None in its dense layers) take the fast path, soft-capping does not.
    exact_fast = kwargs.get("position_bias") is None and dropout == 0.0 and not softcapped(module, kwargs)
    viewed = False
    if session is not None and exact_fast and (not use_eager or hasattr(module, "sinks")):
        fast = session.attend_fast(module, query, key, value, attention_mask, scale, sinks)
        if isinstance(fast, torch.Tensor):
            return fast, None
        viewed = fast  # True: the view went out, the output comes from the delegate
    if use_eager:
        out, _ = _module_eager(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if session is not None and not viewed:
        session.observe(
            module,
            query,
            key,
            attention_mask,
            scale,
            softcap=kwargs.get("softcap"),
            sinks=sinks,
            bias=kwargs.get("position_bias"),
        )
    return out, None


def with_selected_keys(
    mask: torch.Tensor | None, indices: torch.Tensor, n_key: int, additive: bool
) -> torch.Tensor:
    """Return the attention mask with only the keys a sparse-attention indexer selected allowed
    (DeepSeek V3.2's DSA and the families that copy it: ``indices [batch, query, top_k]`` key
    positions per query), as transformers' eager and SDPA paths fold them in; the model passes them
    to other backends as ``indices``, and dropping them would attend to every key. ``mask``: boolean
    (SDPA) or additive (eager) ``[batch, 1, query, key]``, or ``None`` for plain causal attention;
    ``additive``: the form to build when ``mask`` is ``None``."""
    batch, n_query, _ = indices.shape
    dropped = torch.ones(batch, n_query, n_key, dtype=torch.bool, device=indices.device)
    dropped = dropped.scatter(-1, indices.long(), False).unsqueeze(1)  # [batch, 1, query, key]
    if mask is None:
        causal = torch.ones(n_query, n_key, dtype=torch.bool, device=indices.device)
        mask = causal.tril(n_key - n_query)[None, None]  # [1, 1, query, key]
        if additive:
            mask = torch.zeros(mask.shape, device=indices.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min
            )
    if mask.dtype == torch.bool:
        return mask & ~dropped
    return mask.masked_fill(dropped, torch.finfo(mask.dtype).min)


def headatlas_attention(module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``"headatlas"`` backend: SDPA output + statistics (see module docstring)."""
    return _forward(False, module, *args, **kwargs)


def headatlas_eager_attention(
    module: torch.nn.Module, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """The ``"headatlas_eager"`` backend: the model's eager output + statistics."""
    return _forward(True, module, *args, **kwargs)


def register_backends(
    name: str, fn: Callable[..., Any], eager_name: str, eager_fn: Callable[..., Any]
) -> None:
    """Register attention function ``fn`` under ``name`` with SDPA's boolean mask function and
    ``eager_fn`` under ``eager_name`` with the additive eager mask (forgetting the mask
    registration makes transformers pass ``mask=None``, which silently drops padding). Idempotent."""
    if name in _registered_names:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    AttentionInterface.register(eager_name, eager_fn)
    AttentionMaskInterface.register(eager_name, eager_mask)
    _registered_names.add(name)


def register() -> None:
    """Register both backends and their mask functions with transformers (idempotent)."""
    register_backends(NAME, headatlas_attention, EAGER_NAME, headatlas_eager_attention)


def softcapped(module: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether this attention call soft-caps its logits (Gemma 2's ``cap·tanh(logit / cap)``),
    which neither SDPA nor the fused kernel's log-sum-exp can express."""
    config = getattr(module, "config", None)
    return kwargs.get("softcap") is not None or getattr(config, "attn_logit_softcapping", None) is not None


def has_sinks(module: torch.nn.Module) -> bool:
    """Whether attention module ``module`` has learned sinks (a ``sinks`` parameter: gpt-oss, Granite
    SWA, Flint, ...), which SDPA cannot express."""
    return isinstance(getattr(module, "sinks", None), torch.nn.Parameter)


def needs_eager(target: Any) -> bool:
    """Return whether a model's attention needs the eager delegate: logit soft-capping in its config,
    or learned sinks (gpt-oss by name; any family whose attention modules hold a ``sinks`` parameter
    when ``target`` is the model rather than its config). SDPA would silently drop either."""
    model = target if isinstance(target, torch.nn.Module) else None
    config: Any = model.config if model is not None else target
    text: Any = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None) is not None or text.model_type == "gpt_oss":
        return True
    return model is not None and any(has_sinks(m) for m in model.modules())
