"""What each architecture family needs, as data.

Model families differ only in the rows of :data:`ARCHITECTURES`, never in copied code. A row
says where a layer's attention output projection lives (the module whose *input* is the
concatenation of per-head outputs, used by :func:`headatlas.ablate`) and whether attention is
bidirectional. Unknown ``model_type`` values fall back to :data:`GENERIC`, which tries the
common spellings in order.

Encoder–decoder families (T5, BART, Marian, ...) have three kinds of attention layer, and the
atlas numbers them in one sequence (:func:`attention_stacks`): the encoder's self-attention layers
first, then the decoder's self-attention layers, then its cross-attention layers.
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
            (:mod:`headatlas.model.surgery`); ``None`` where projections are fused or named otherwise,
            which pruning refuses with a clear error.
        attn_out_norm: attribute of the decoder layer holding a norm applied to the attention
            output before it joins the residual stream (Gemma 2/3's sandwich norm), else ``None``.
        final_norm: attribute names, on ``model.base_model``, of the norm before the LM head
            (the first that exists is used by direct-logit scores).
        cross_attention: for encoder–decoder families, the attribute name of a decoder layer's
            cross-attention module (``encoder_attn``, T5's ``EncDecAttention``), else ``None``.
        refused: why headatlas refuses this family's heads (capture and head outputs), one line;
            ``None`` for a family it supports. Found by the conformance sweep
            (:mod:`headatlas.apps.conformance`), never guessed.
        capture_refused: why capture alone is refused (head outputs still work), one line.
        kv_refused: why the head-wise KV cache (:mod:`headatlas.apps.kv`) is refused, one line.
    """

    o_proj: tuple[str, ...]
    causal: bool = True
    attn_proj: tuple[str, str, str, str] | None = None
    attn_out_norm: str | None = None
    final_norm: tuple[str, ...] = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
    cross_attention: str | None = None
    refused: str | None = None
    capture_refused: str | None = None
    kv_refused: str | None = None


_SELF_ATTN_O = r"(?:^|\.)(\d+)\.self_attn\.o_proj$"
_GPT2_C_PROJ = r"(?:^|\.)(\d+)\.attn\.c_proj$"
_BERT_DENSE = r"(?:^|\.)(\d+)\.attention\.output\.dense$"
_OUT_PROJ = r"(?:^|\.)(\d+)\.self_attn\.out_proj$"
_DENSE = r"(?:^|\.)(\d+)\.self_attn\.dense$"
_NEOX_DENSE = r"(?:^|\.)(\d+)\.attention\.dense$"
_SELF_ATTENTION_DENSE = r"(?:^|\.)(\d+)\.self_attention\.dense$"
_ATTN_OUT_PROJ = r"(?:^|\.)(\d+)\.attn\.out_proj$"
_MASK_DROPPED = (
    "asked for output_attentions, transformers' implementation of this family adds a boolean mask "
    "as numbers (the causal mask is lost and the forward changes), and the family cannot swap "
    "attention backends: capture refused (head outputs, ablation and patching work)"
)
_DIFFERENTIAL = (
    "differential attention: a head's output is the difference of two softmax maps, which no "
    "single attention probability describes; headatlas refuses its heads"
)

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
    "gpt_neox": ArchSpec((_NEOX_DENSE,)),  # fused query_key_value: not prunable
    "falcon": ArchSpec((_SELF_ATTENTION_DENSE,), capture_refused=_MASK_DROPPED),
    "bloom": ArchSpec((_SELF_ATTENTION_DENSE,)),
    "mpt": ArchSpec((_ATTN_OUT_PROJ,)),
    "gptj": ArchSpec((_ATTN_OUT_PROJ,)),
    "codegen": ArchSpec((_ATTN_OUT_PROJ,)),
    "diffllama": ArchSpec((_SELF_ATTN_O,), refused=_DIFFERENTIAL),
    # Doge computes a dynamic mask from the cached values; Moshi's depth decoder keeps its own cache
    "doge": ArchSpec(
        (_SELF_ATTN_O,), kv_refused="its attention reads the cached values to build a dynamic mask"
    ),
    "moshi": ArchSpec((_SELF_ATTN_O,), kv_refused="its depth decoder keeps a cache of its own"),
    "albert": ArchSpec(
        (),
        causal=False,
        refused="ALBERT shares one layer's weights across every layer: the same heads run once per layer, "
        "which one row per layer and head cannot hold; headatlas refuses its heads",
    ),
    "mra": ArchSpec(
        (),
        causal=False,
        refused="multi-resolution approximate attention: no attention probabilities, and the head "
        "outputs never reach an output projection as heads; headatlas refuses its heads",
    ),
    # Encoder–decoder families: their attention modules call transformers' attention interface
    # (checked against eager in tests/test_seq2seq.py); head ablation and pruning do not cover them.
    **{
        name: ArchSpec((), cross_attention="EncDecAttention")
        for name in ("t5", "mt5", "umt5", "switch_transformers")
    },
    **{name: ArchSpec((), cross_attention="cross_attention") for name in ("seamless_m4t", "seamless_m4t_v2")},
    **{
        name: ArchSpec((), cross_attention="encoder_attn")
        for name in (
            "marian",
            "pegasus",
            "m2m_100",
            "whisper",
            "blenderbot",
            "blenderbot-small",
            "plbart",
        )
    },
    # BART and mBART also ship a decoder-only causal LM (BartForCausalLM): its heads are hooked there
    **{name: ArchSpec((_OUT_PROJ,), cross_attention="encoder_attn") for name in ("bart", "mbart")},
}

GENERIC = ArchSpec((_SELF_ATTN_O, _GPT2_C_PROJ, _BERT_DENSE, _OUT_PROJ, _DENSE))


def arch_spec(model_type: str) -> ArchSpec:
    """Return the :class:`ArchSpec` row for ``model_type`` (``config.model_type``), or the generic one."""
    return ARCHITECTURES.get(model_type, GENERIC)


_TOWER = re.compile(r"(?:^|\.)\w*(?:vision|image|visual|audio|speech|acoustic|projector|qformer)\w*(?:\.|$)")
"""A module name inside a multimodal model's non-text tower (a vision or audio encoder, a projector):
its attention layers are not the language model's, and must never be taken for them."""


def in_text_stack(module_name: str) -> bool:
    """Whether ``module_name`` lies outside every vision / audio tower and projector (:data:`_TOWER`)."""
    return _TOWER.search(module_name) is None


def value_head_dim(config: object, head_dim: int) -> int:
    """Return the width of one head's output (the output projection reads ``head * d_value``):
    ``v_head_dim`` where the config has one (DeepSeek's multi-head latent attention, where the
    query/key head size differs from the value's), else ``head_dim``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # type: ignore[attr-defined]
    value = getattr(text, "v_head_dim", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else head_dim


def _linear_shape(module: object) -> tuple[int, int] | None:
    """``(in, out)`` features of an ``nn.Linear`` or GPT-2 ``Conv1D`` child, else ``None``."""
    weight = getattr(module, "weight", None)
    shape = getattr(weight, "shape", None)
    if shape is None or len(shape) != 2:
        return None
    if type(module).__name__ == "Conv1D":
        return int(shape[0]), int(shape[1])
    if type(module).__name__.endswith("Linear"):
        return int(shape[1]), int(shape[0])
    return None


def projections_by_structure(model: object, width: int, hidden: int) -> dict[int, str]:
    """Return ``{layer: module name}`` of attention output projections found by structure, for
    families no row's pattern matches: in every attention module (a ``*Attention`` module with no
    attention module inside it), the last linear child that reads ``width`` (= heads × value head
    size: the concatenated heads) and writes ``hidden`` (the residual stream). The layer is the
    attention module's ``layer_idx``, else the first number in its name."""
    found: dict[int, str] = {}
    for name, module in model.named_modules():  # type: ignore[attr-defined]
        if not _is_attention(module) or not in_text_stack(name):
            continue
        chosen = None
        for child_name, child in module.named_children():
            if _linear_shape(child) == (width, hidden):
                chosen = child_name
        if chosen is None:
            continue
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int):
            number = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
            if number is None:
                continue
            layer = int(number.group(1))
        found.setdefault(layer, f"{name}.{chosen}" if name else chosen)
    return found


def match_layer(patterns: tuple[str, ...], module_name: str) -> int | None:
    """Return the layer index encoded in ``module_name`` if it matches one of ``patterns``, else ``None``."""
    for pattern in patterns:
        found = re.search(pattern, module_name)
        if found:
            return int(found.group(1))
    return None


ATTN_KINDS = ("encoder", "decoder", "cross")
"""Kinds of attention layer (the atlas's ``attn_kind`` column): an encoder's self-attention, a
decoder's (causal) self-attention, and a decoder's cross-attention over the encoder's output."""


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of an encoder–decoder model: its kind, its layer within its stack,
    its atlas layer index and its module name."""

    kind: str
    stack_layer: int
    layer: int
    name: str


def _is_attention(module: object) -> bool:
    """An attention module is one named ``*Attention`` with no ``*Attention`` module inside it
    (T5's ``T5LayerSelfAttention`` wraps the ``T5Attention`` that computes)."""
    if not type(module).__name__.endswith("Attention"):
        return False
    children: list[object] = list(getattr(module, "children", list)())
    return not any(type(c).__name__.endswith("Attention") for c in children)


def attention_layer_numbers(model: object) -> list[int]:
    """Return the ``layer_idx`` of every self-attention module of a one-stack ``model``, sorted (a
    hybrid stack's attention layers: the other layers are Mamba or linear attention and have no heads)."""
    found = {
        module.layer_idx  # type: ignore[attr-defined]
        for module in model.modules()  # type: ignore[attr-defined]
        if _is_attention(module) and isinstance(getattr(module, "layer_idx", None), int)
    }
    return sorted(found)


def attention_stacks(model: object) -> list[AttentionLayer] | None:
    """Return the attention layers of an encoder–decoder ``model`` in atlas order, or ``None`` for a
    model with one stack (decoder-only or encoder-only).

    Atlas layer ``l`` is encoder layer ``l`` for ``l < E``, decoder self-attention layer ``l − E``
    for ``E ≤ l < E + D``, and cross-attention layer ``l − E − D`` after that. A decoder module is
    cross-attention when its attribute name is the family's :attr:`ArchSpec.cross_attention`.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    cross = arch_spec(str(getattr(config, "model_type", ""))).cross_attention
    names = {id(m): n for n, m in model.named_modules()}  # type: ignore[attr-defined]
    found: dict[str, list[tuple[int, str]]] = {kind: [] for kind in ATTN_KINDS}
    for kind, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):  # type: ignore[attr-defined]
        for name, module in stack.named_modules():
            if not _is_attention(module):
                continue
            number = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
            if number is None:
                continue
            leaf = name.rsplit(".", 1)[-1]
            is_cross = kind == "decoder" and (leaf == cross if cross else "cross" in leaf.lower())
            found["cross" if is_cross else kind].append((int(number.group(1)), names[id(module)]))
    out: list[AttentionLayer] = []
    for kind in ATTN_KINDS:
        for stack_layer, name in sorted(found[kind]):
            out.append(AttentionLayer(kind, stack_layer, len(out), name))
    return out
