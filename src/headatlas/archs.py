"""What each architecture family needs, as data.

Model families differ only in the rows of :data:`ARCHITECTURES`, never in copied code. A row
says where a layer's attention output projection lives (the module whose *input* is the
concatenation of per-head outputs, used by :func:`headatlas.ablate`) and whether attention is
bidirectional. Unknown ``model_type`` values fall back to :data:`GENERIC`, which tries the
common spellings in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """How to find the per-layer attention output projection of one architecture family.

    Attributes:
        o_proj: regular expressions matched against ``model.named_modules()`` names; the first
            group is the layer index. The matched module's input is ``[batch, query, head * d_head]``.
        causal: ``True`` for decoders, ``False`` for bidirectional encoders.
        attn_proj: attribute names ``(q, k, v, o)`` of the separate ``nn.Linear`` projections on
            the attention module (the parent of the matched output projection), for head pruning
            (:mod:`headatlas.surgery`); ``None`` where projections are fused or named otherwise,
            which pruning refuses with a clear error.
        attn_out_norm: attribute of the decoder layer holding a norm applied to the attention
            output before it joins the residual stream (Gemma 2/3's sandwich norm), else ``None``.
        final_norm: attribute names, on ``model.base_model``, of the norm before the LM head
            (the first that exists is used by direct-logit scores).
    """

    o_proj: tuple[str, ...]
    causal: bool = True
    attn_proj: tuple[str, str, str, str] | None = None
    attn_out_norm: str | None = None
    final_norm: tuple[str, ...] = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


_SELF_ATTN_O = r"(?:^|\.)(\d+)\.self_attn\.o_proj$"
_GPT2_C_PROJ = r"(?:^|\.)(\d+)\.attn\.c_proj$"
_BERT_DENSE = r"(?:^|\.)(\d+)\.attention\.output\.dense$"
_OUT_PROJ = r"(?:^|\.)(\d+)\.self_attn\.out_proj$"
_DENSE = r"(?:^|\.)(\d+)\.self_attn\.dense$"

_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec((_SELF_ATTN_O,), attn_proj=_QKVO),
    "mistral": ArchSpec((_SELF_ATTN_O,), attn_proj=_QKVO),
    "qwen2": ArchSpec((_SELF_ATTN_O,), attn_proj=_QKVO),
    "qwen3": ArchSpec((_SELF_ATTN_O,), attn_proj=_QKVO),
    "gemma": ArchSpec((_SELF_ATTN_O,), attn_proj=_QKVO),
    "gemma2": ArchSpec((_SELF_ATTN_O,), attn_proj=_QKVO, attn_out_norm="post_attention_layernorm"),
    "gemma3": ArchSpec((_SELF_ATTN_O,), attn_proj=_QKVO, attn_out_norm="post_attention_layernorm"),
    "gemma3_text": ArchSpec((_SELF_ATTN_O,), attn_proj=_QKVO, attn_out_norm="post_attention_layernorm"),
    "phi3": ArchSpec((_SELF_ATTN_O,)),  # fused qkv_proj: not prunable yet
    "olmo2": ArchSpec((_SELF_ATTN_O,)),  # q_norm spans all heads: not prunable
    "gpt2": ArchSpec((_GPT2_C_PROJ,)),
    "bert": ArchSpec((_BERT_DENSE,), causal=False),
    "roberta": ArchSpec((_BERT_DENSE,), causal=False),
    "opt": ArchSpec((_OUT_PROJ,)),
    "phi": ArchSpec((_DENSE,)),
}

GENERIC = ArchSpec((_SELF_ATTN_O, _GPT2_C_PROJ, _BERT_DENSE, _OUT_PROJ, _DENSE))


def arch_spec(model_type: str) -> ArchSpec:
    """Return the :class:`ArchSpec` row for ``model_type`` (``config.model_type``), or the generic one."""
    return ARCHITECTURES.get(model_type, GENERIC)


def match_layer(patterns: tuple[str, ...], module_name: str) -> int | None:
    """Return the layer index encoded in ``module_name`` if it matches one of ``patterns``, else ``None``."""
    for pattern in patterns:
        found = re.search(pattern, module_name)
        if found:
            return int(found.group(1))
    return None
