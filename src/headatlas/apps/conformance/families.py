"""Every family of transformers' auto mappings, built tiny from its own config class.

A family is a ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``,
``MODEL_FOR_MASKED_LM_MAPPING_NAMES`` or ``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES``. The
generic shrinker (:func:`shrink`) starts from the config class's defaults and rewrites the fields it
knows by name (layers, widths, heads with a GQA ratio where the family has one, vocabulary, experts,
per-layer lists) in the config and in every nested config; what a family needs beyond that is one
row of :data:`OVERRIDES`, data like :mod:`headatlas.model.archs`. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ...core.errors import HeadatlasError

logger = logging.getLogger(__name__)

KINDS = ("causal", "masked", "seq2seq")
"""The three mappings, in page order."""

LAYERS = 2
"""Layers of a tiny model (more when its per-layer types need them: one of each type)."""
VOCAB = 512
"""Vocabulary of a tiny model (the tiny tokenizer uses fewer ids)."""
INIT_RANGE = 0.2
"""Initialiser standard deviation: large enough that random attention is peaky, so a wrong
probability is visible in the scores (the tests' builders sharpen q/k for the same reason)."""

_SIZES: dict[str, float] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "n_embed", "embed_dim", "model_dim", "dim"), 64),
    **dict.fromkeys(
        (
            "intermediate_size",
            "n_inner",
            "ffn_dim",
            "d_ff",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "ffn_hidden_size",
            "inner_hidden_size",
        ),
        128,
    ),
    **dict.fromkeys(
        (
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "expert_intermediate_size",
        ),
        32,
    ),
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
        ),
        4,
    ),
    **dict.fromkeys(("attention_heads", "num_encoder_attention_heads", "num_decoder_attention_heads"), 4),
    **dict.fromkeys(("rotary_dim",), 8),
    **dict.fromkeys(("emb_dim",), 64),
    **dict.fromkeys(("moe_k",), 2),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels", "attention_head_dim", "d_head"), 16),
    **dict.fromkeys(("vocab_size",), VOCAB),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"), 2),
    **dict.fromkeys(("n_group", "topk_group", "first_k_dense_replace"), 1),
    # multi-head latent attention (DeepSeek V2/V3): q/k head size 24 ≠ v head size 16, on purpose
    **{"q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16},
    **{"v_head_dim": 16, "qk_head_dim": 24},
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_target_positions"), 512),
    **dict.fromkeys(("sliding_window", "attention_window", "window_size"), 8),
    # sparse attention that an indexer picks per query (DeepSeek V3.2's DSA, MiniMax M3): fewer
    # keys than the sweep's texts have, so the selection really drops keys
    **dict.fromkeys(("index_topk",), 4),
    **dict.fromkeys(("index_block_size", "index_topk_blocks"), 2),
    **dict.fromkeys(("initializer_range", "init_std"), INIT_RANGE),
}
"""Integer fields the shrinker sets wherever a config (or a nested one) has them as numbers."""

_LAYER_COUNTS = (
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
)
_KV_HEADS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
_PER_LAYER = ("layer_types", "layers_block_type", "block_types", "layers_type")
_SPECIAL = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "decoder_start_token_id": 0}

OVERRIDES: dict[str, dict[str, Any]] = {
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
    },
    "deepseek_v3": {"head_dim": 8},
    "deepseek_v2": {"head_dim": 8, "num_experts_per_tok": 2, "topk_method": "greedy"},
    "falcon": {"new_decoder_architecture": False, "multi_query": True},
    "gpt_neox": {"rotary_pct": 0.5},
    "falcon_h1": {"mamba_d_ssm": 128, "mamba_n_heads": 16, "mamba_d_state": 16, "mamba_chunk_size": 16},
    # MiniMax M3's sparse layers exist only when a checkpoint lists them (real ones do)
    "minimax_m3_vl_text": {"layer_types": ["full_attention", "minimax_m3_sparse"]},
    "reformer": {
        "attn_layers": ["local", "lsh"],
        "axial_pos_shape": [16, 32],
        "axial_pos_embds_dim": [32, 32],
    },
}
"""Per-family fields on top of the generic shrinker, as data (one row per family that needs one)."""


REPRESENTATIVE: tuple[tuple[str, str], ...] = (
    *(
        ("causal", name)
        for name in (
            "llama",
            "qwen3",
            "mistral",
            "gemma2",
            "gemma3_text",
            "gpt2",
            "gpt_neox",
            "gpt_neo",
            "bloom",
            "falcon",
            "mpt",
            "gptj",
            "codegen",
            "phi3",
            "deepseek_v3",
            "gpt_oss",
            "granite_swa",
            "deepseek_v32",
            "mixtral",
            "olmo2",
            "diffllama",
            "bitnet",
            "jamba",
            "mamba",
        )
    ),
    ("masked", "bert"),
    ("masked", "roberta"),
    ("masked", "modernbert"),
    ("seq2seq", "t5"),
    ("seq2seq", "bart"),
)
"""``(mapping, family)`` pairs the tests re-check against the page (``make test``): the issue's named
hard cases and at least one family of each category; the whole sweep is ``make models-doc``."""


@dataclass(frozen=True)
class Family:
    """One family of a mapping: its ``model_type``, which mapping (``causal``, ``masked``,
    ``seq2seq``) and the model class name the mapping gives."""

    name: str
    kind: str
    class_name: str


class CannotBuild(Exception):
    """A family whose config or model cannot be built tiny (the reason is the message)."""


def families(kinds: tuple[str, ...] = KINDS) -> list[Family]:
    """Return every family of the chosen mappings, in page order (mapping, then name)."""
    from transformers.models.auto import modeling_auto as auto

    mappings = {
        "causal": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "masked": auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        "seq2seq": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    }
    out = []
    for kind in kinds:
        for name, cls in sorted(mappings[kind].items()):
            out.append(Family(name, kind, cls if isinstance(cls, str) else cls[0]))
    return out


def _pick_layers(types: list[Any]) -> list[int]:
    """Layer indices that keep one layer of each type (first occurrences), at least :data:`LAYERS`."""
    firsts = sorted({str(t): i for i, t in reversed(list(enumerate(types)))}.values())
    extra = [i for i in range(len(types)) if i not in firsts][: max(0, LAYERS - len(firsts))]
    return sorted(firsts + extra)


def _per_layer_lists(values: dict[str, Any]) -> list[int] | None:
    for key in _PER_LAYER:
        if isinstance(values.get(key), list) and values[key]:
            return _pick_layers(values[key])
    return None


def _per_layer_size(key: str, value: Any, base: Any) -> Any:
    """A per-layer override of size field ``key``, shrunk so that it still differs from the
    config's own ``base`` the way it did (wider stays wider: Gemma 4's full-attention heads)."""
    if key not in _SIZES or not isinstance(value, int) or isinstance(value, bool):
        return value
    tiny = int(_SIZES[key])
    if isinstance(base, int) and value != base:
        return tiny * 2 if value > base else max(1, tiny // 2)
    return tiny


def _per_layer_config(value: dict[str, Any], keep: list[int], values: dict[str, Any]) -> dict[str, Any]:
    """A ``per_layer_config`` (per-layer overrides keyed by the zero-padded layer index: Gemma 4's
    wider full-attention heads, NeoMME's windows) cut to the kept layers, renumbered, its sizes
    shrunk like the config's own (``values``)."""
    width = max((len(k) for k in value), default=2)
    by_layer = {int(k): v for k, v in value.items()}
    out: dict[str, Any] = {}
    for new, old in enumerate(keep):
        entry = by_layer.get(old)
        if isinstance(entry, dict):
            out[str(new).zfill(width)] = {k: _per_layer_size(k, v, values.get(k)) for k, v in entry.items()}
    return out


def shrink(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a tiny copy of config dict ``values`` (a config's ``to_dict()``): every known size field
    rewritten, nested configs shrunk the same way, per-layer lists cut to the kept layers, then
    ``overrides`` on top."""
    out = dict(values)
    n_layers = next((v for k in _LAYER_COUNTS if isinstance(v := values.get(k), int)), None)
    keep = _per_layer_lists(values) or list(range(LAYERS))
    for key, value in values.items():
        if key == "per_layer_config" and isinstance(value, dict):
            out[key] = _per_layer_config(value, keep, values)
        elif isinstance(value, dict) and ("model_type" in value or key.endswith(("_config", "config"))):
            out[key] = shrink(value)
        elif key in _SIZES and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = _SIZES[key] if key not in ("max_position_embeddings",) else min(value, 512)
        elif key in _LAYER_COUNTS and isinstance(value, int) and value > 0:
            out[key] = len(keep)
        elif isinstance(value, list) and n_layers and len(value) == n_layers and n_layers > len(keep):
            out[key] = [value[i] for i in keep]
        elif key in _SPECIAL and (value is None or isinstance(value, int)):
            out[key] = _SPECIAL[key]
    heads = next((out[k] for k in _SIZES if k in values and _SIZES[k] == 4 and k in out), None)
    for key in _KV_HEADS:
        value = values.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            full = next(
                (values[k] for k in ("num_attention_heads", "n_head", "n_heads") if k in values), None
            )
            out[key] = 1 if value == 1 else (heads or 4) if value == full else 2
    out.update(overrides or {})
    return out


TEXTS: tuple[str, ...] = (
    "The old lighthouse keeper counted seventeen ships before the storm arrived.",
    "A small fox crossed the frozen river while the village slept.",
    "Numbers like 12, 345 and 6789 appear in the ledger twice.",
    "She wrote the letter, folded it, and hid it under the loose floorboard.",
    "Unbelievably, the committee's extraordinary recommendations were approved.",
    "Rain.",
)
"""The sweep's texts, of clearly different lengths (left padding is exercised); the tokenizer is
trained on them, so long words split into several pieces (subword scores are exercised)."""


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained in code on a few sentences (deterministic, < :data:`VOCAB`
    ids; ``<bos>``/``<eos>``/``<pad>`` are 0/1/2, ``[CLS]``/``[SEP]``/``[MASK]`` follow; left padding,
    BOS added). Shared: callers must not mutate it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<bos>", "<eos>", "<pad>", "[CLS]", "[SEP]", "[MASK]", "<unk>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(TEXTS) * 4, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        unk_token="<unk>",
        padding_side="left",
    )


def tiny_config(family: Family) -> Any:
    """Return the tiny config of ``family``; raise :class:`CannotBuild` with the config's complaint."""
    from transformers import CONFIG_MAPPING

    try:
        cls = CONFIG_MAPPING[family.name]
        values = {k: v for k, v in cls().to_dict().items() if k not in ("transformers_version", "model_type")}
        return cls(**shrink(values, OVERRIDES.get(family.name)))
    except Exception as error:
        raise CannotBuild(f"config: {_one_line(error)}") from error


def build_tiny(family: Family, seed: int = 0) -> Any:
    """Return a tiny random fp32 model of ``family`` in eval mode (seeded); raise :class:`CannotBuild`."""
    import transformers

    config = tiny_config(family)
    cls = getattr(transformers, family.class_name, None)
    if cls is None:
        raise CannotBuild(f"transformers has no class {family.class_name}")
    torch.manual_seed(seed)
    try:
        model = cls(config)
    except Exception as error:
        raise CannotBuild(f"model: {_one_line(error)}") from error
    return model.float().eval()


def load_tiny(family: Family, seed: int = 0) -> Any:
    """Return ``headatlas.load`` of :func:`build_tiny` with :func:`tiny_tokenizer`; raise
    :class:`CannotBuild` or :class:`HeadatlasError` (no attention headatlas can see)."""
    from ...model.load import load

    model = build_tiny(family, seed)
    try:
        model.config._name_or_path = f"tiny-{family.name}"
        loaded = load(model, tokenizer=tiny_tokenizer())
    except HeadatlasError:
        raise
    except Exception as error:
        raise CannotBuild(f"load: {_one_line(error)}") from error
    smoke_test(model, loaded.info.encoder_decoder)
    return loaded


def smoke_test(model: torch.nn.Module, encoder_decoder: bool) -> None:
    """Run one plain forward pass (no headatlas code) on six tokens; raise :class:`CannotBuild`
    when transformers itself cannot run the tiny model (the shrinker's fault, not a finding)."""
    ids = torch.tensor([[0, 7, 8, 9, 10, 11]])
    extra = {"decoder_input_ids": ids} if encoder_decoder else {}
    try:
        with torch.no_grad():
            model(input_ids=ids, **extra)
    except Exception as error:
        raise CannotBuild(f"forward: {_one_line(error)}") from error


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:160]}"
