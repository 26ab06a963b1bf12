"""What a loaded model is: :class:`ModelInfo` (the facts every later stage needs) and
:class:`LoadedModel` (model, tokenizer, facts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..core.errors import HeadatlasError, param
from .archs import arch_spec, attention_stacks, value_head_dim

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model that every later stage needs.

    ``n_heads`` counts query heads, ``n_kv_heads`` key/value heads (``n_heads`` for MHA, fewer
    for GQA/MQA); query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``. ``head_dim`` is
    the width of one head's output (the value head size where it differs from the query/key
    size, as in DeepSeek's multi-head latent attention).
    """

    name: str
    source: str
    sha256: str | None
    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    causal: bool
    context_length: int | None
    sliding_window: int | None = None
    attn_kinds: tuple[str, ...] | None = None
    """Encoder–decoder models: the kind of each atlas layer (``encoder``, ``decoder``, ``cross``;
    :func:`headatlas.model.archs.attention_stacks`), and ``n_layers`` counts all of them. ``None`` for a
    model with one stack, whose layers are all ``decoder`` (causal) or all ``encoder``."""
    revision: str | None = None
    """The commit of the Hugging Face hub snapshot a hub id was loaded from; ``None`` otherwise."""

    @property
    def encoder_decoder(self) -> bool:
        """Whether the model has an encoder and a decoder (and so cross-attention)."""
        return self.attn_kinds is not None

    def kind(self, layer: int) -> str:
        """Return the kind of atlas layer ``layer``: ``encoder``, ``decoder`` or ``cross``."""
        if self.attn_kinds is not None:
            return self.attn_kinds[layer]
        return "decoder" if self.causal else "encoder"

    def stack_layer(self, layer: int) -> int:
        """Return atlas layer ``layer``'s index within its own stack (encoder, decoder self, cross)."""
        if self.attn_kinds is None:
            return layer
        return self.attn_kinds[:layer].count(self.attn_kinds[layer])

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """Return the KV head that query head ``head`` reads."""
        return head // self.group_size

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict (``attn_kinds`` only for encoder–decoder models,
        ``revision`` only for a model from the hub)."""
        out = asdict(self)
        if self.revision is None:
            del out["revision"]
        if self.attn_kinds is None:
            del out["attn_kinds"]
        else:
            out["attn_kinds"] = list(self.attn_kinds)
        return out

    @classmethod
    def from_facts(cls, facts: Mapping[str, Any], n_layers: int = 0, n_heads: int = 0) -> ModelInfo:
        """Return the :class:`ModelInfo` recorded as ``facts`` (:meth:`to_dict`'s dict, an atlas's
        ``model``). Fields an older record lacks take neutral values: ``n_layers`` / ``n_heads`` the
        given ones, ``n_kv_heads`` = ``n_heads`` (multi-head attention), a causal model of unknown
        name, source, head size and context."""

        def number(key: str, default: int | None) -> int | None:
            value = facts.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else default

        layers = number("n_layers", n_layers) or n_layers
        heads = number("n_heads", n_heads) or n_heads
        kinds = facts.get("attn_kinds")
        return cls(
            name=str(facts.get("name") or "?"),
            source=str(facts.get("source") or "unknown"),
            sha256=facts.get("sha256") if isinstance(facts.get("sha256"), str) else None,
            arch=str(facts.get("arch") or "unknown"),
            n_layers=layers,
            n_heads=heads,
            n_kv_heads=number("n_kv_heads", heads) or heads,
            head_dim=number("head_dim", 0) or 0,
            causal=bool(facts.get("causal", True)),
            context_length=number("context_length", None),
            sliding_window=number("sliding_window", None),
            attn_kinds=tuple(str(k) for k in kinds) if isinstance(kinds, list | tuple) else None,
            revision=facts.get("revision") if isinstance(facts.get("revision"), str) else None,
        )

    def require_one_stack(self, what: str) -> None:
        """Raise :class:`HeadatlasError` when ``what`` (a command or battery) cannot run on an
        encoder–decoder model."""
        if self.encoder_decoder:
            raise HeadatlasError(
                f"{what} works on decoder-only and encoder-only models; {self.name} ({self.arch}) is "
                "encoder–decoder: scan it with the natural, repeat and align batteries"
            )


@dataclass
class LoadedModel:
    """A model, its tokenizer and its :class:`ModelInfo`, as returned by :func:`load`."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device


_HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")
"""Fields an atlas needs the same in every layer (one table of heads, one head width)."""


def _per_layer_value(config: Any, name: str) -> Any:
    """The value of a field transformers keeps per layer (``per_layer_config``: Gemma 4's wider
    full-attention heads, NeoMME's windows) when every layer has the same; ``None`` when they
    differ, or a :class:`HeadatlasError` when an atlas needs it to be one number."""
    layers = config.per_layer_config
    values = {getattr(layers[i], name, None) for i in range(int(config.num_hidden_layers))}
    if len(values) == 1:
        return values.pop()
    if name in _HEAD_FIELDS:
        raise HeadatlasError(
            f"{config.model_type}: {name} differs between layers ({', '.join(sorted(map(str, values)))}): "
            "an atlas needs one head layout in every layer; refused"
        )
    return None


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        try:
            value = getattr(config, name, None)
        except Exception as error:  # transformers' per-layer attributes refuse a global read
            if type(error).__name__ != "AmbiguousGlobalPerLayerAttributeError":
                raise
            value = _per_layer_value(config, name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def model_info(
    model: PreTrainedModel, name: str, source: str, sha256: str | None, revision: str | None = None
) -> ModelInfo:
    """Return the :class:`ModelInfo` of ``model`` (``revision``: the hub commit it came from, if any);
    raise :class:`HeadatlasError` if it has no attention."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    if not n_layers or not n_heads:
        raise HeadatlasError(
            f"model {name!r} ({config.model_type}) has no attention layers headatlas can see: "
            "give a transformer with self-attention"
        )
    n_kv = _config_int(config, "num_key_value_heads", "n_kv_heads") or n_heads
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model") or 0
    # one head's output width: the value head size (DeepSeek's latent attention: q/k ≠ v)
    head_dim = value_head_dim(config, _config_int(config, "head_dim", "d_kv") or hidden // n_heads)
    stacks = attention_stacks(model)
    if stacks is not None:
        n_layers = _encoder_decoder_layers(config, name, len(stacks), n_heads)
    attn_modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")]
    causal = (
        any(bool(m.is_causal) for m in attn_modules) if attn_modules else _causal_without_flags(model, config)
    )
    window = _config_int(config, "sliding_window")
    return ModelInfo(
        name=name,
        source=source,
        sha256=sha256,
        revision=revision,
        arch=str(config.model_type),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        causal=causal,
        context_length=_config_int(config, "max_position_embeddings", "n_positions"),
        sliding_window=window,
        attn_kinds=None if stacks is None else tuple(layer.kind for layer in stacks),
    )


def _causal_without_flags(model: Any, config: Any) -> bool:
    """Whether a model whose attention modules carry no ``is_causal`` flag is causal: its family's
    row where there is one, else not for a masked-LM head or an encoder config (``is_decoder`` off
    on a BERT-style config), else causal."""
    from .archs import ARCHITECTURES

    if config.model_type in ARCHITECTURES:
        return arch_spec(config.model_type).causal
    return not type(model).__name__.endswith("ForMaskedLM")


def _encoder_decoder_layers(config: Any, name: str, found: int, n_heads: int) -> int:
    """Return the number of atlas layers of an encoder–decoder model (encoder + 2 × decoder), after
    checking that the modules found match the config and every stack has ``n_heads`` heads."""
    encoder = _config_int(config, "encoder_layers", "num_layers") or 0
    decoder = _config_int(config, "decoder_layers", "num_decoder_layers") or encoder
    if found != encoder + 2 * decoder:
        raise HeadatlasError(
            f"model {name!r} ({config.model_type}): found {found} attention modules, its config says "
            f"{encoder} encoder + 2 × {decoder} decoder layers; headatlas cannot number its layers"
        )
    heads = {
        _config_int(config, "encoder_attention_heads", "num_heads"),
        _config_int(config, "decoder_attention_heads", "num_heads"),
    }
    heads.discard(None)
    if heads and heads != {n_heads}:
        raise HeadatlasError(
            f"model {name!r} has different head counts in its encoder and decoder ({sorted(heads)}): "  # type: ignore[type-var]
            "an atlas needs one head count for every layer"
        )
    return encoder + 2 * decoder


def check_loaded(value: Any, name: str = "loaded") -> LoadedModel:
    """Return ``value`` after checking it is a :class:`LoadedModel` (what :func:`headatlas.load`
    returns); raise :class:`HeadatlasError` naming parameter ``name`` otherwise."""
    if not isinstance(value, LoadedModel):
        raise HeadatlasError(
            f"{param(name)} must be the LoadedModel headatlas.load returns, got {type(value).__name__}: "
            "load it first (ha.load(...))"
        )
    return value
