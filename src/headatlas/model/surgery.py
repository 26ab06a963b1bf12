"""Physically remove query heads from a model's attention layers (head pruning).

Michel et al. 2019 ("Are Sixteen Heads Really Better than One?") and Voita et al. 2019 showed
that many heads can be removed. transformers v5 dropped ``prune_heads``, so this module does the
surgery on the projections themselves, for families whose :class:`~headatlas.model.archs.ArchSpec`
names separate ``q/k/v/o`` projections:

- a removed query head loses its ``head_dim`` rows of ``q_proj`` and its columns of ``o_proj``;
- a KV head loses its rows of ``k_proj``/``v_proj`` only when every query head of its group is
  removed (GQA/MQA);
- transformers' attention repeats each KV head ``num_key_value_groups`` times, so all surviving
  groups of a layer must hold the same number of query heads. Where pruning leaves groups of
  different sizes, smaller groups are padded with some of their removed heads kept as *dead
  slots*: their ``o_proj`` columns are zeroed (so their output is exactly 0) but their rows stay.
  A layer whose every head is removed keeps one dead slot (``--allow-empty-layers``), because the
  attention code cannot run with zero heads.

The result is a :class:`HeadLayout` per layer, stored in the config as ``headatlas_pruning`` so
:func:`headatlas.load` can rebuild the shapes (:func:`apply_layouts`) before loading the weights.
When every layer ends with the same shape, the config's head counts are rewritten and plain
``transformers`` reloads the checkpoint too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import HeadatlasError
from .archs import arch_spec, in_text_stack, match_layer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CONFIG_KEY = "headatlas_pruning"


@dataclass(frozen=True)
class HeadLayout:
    """One layer after pruning: query-head slots grouped by KV head.

    Attributes:
        slots: original query-head ids in their new order (slot ``i`` reads new KV head
            ``i // group``).
        live: per slot, ``False`` for a dead slot (removed head kept only for shape; zero output).
        kv_heads: original KV-head ids kept, in order.
    """

    slots: tuple[int, ...]
    live: tuple[bool, ...]
    kv_heads: tuple[int, ...]

    @property
    def group(self) -> int:
        """Query slots per kept KV head."""
        return len(self.slots) // len(self.kv_heads)

    def to_dict(self) -> dict[str, list[Any]]:
        """JSON-ready form (stored in the model config)."""
        return {"slots": list(self.slots), "live": list(self.live), "kv_heads": list(self.kv_heads)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadLayout:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["slots"]), tuple(bool(x) for x in data["live"]), tuple(data["kv_heads"]))


def plan_layouts(
    removed: Iterable[tuple[int, int]],
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    allow_empty_layers: bool = False,
) -> dict[int, HeadLayout]:
    """Return the :class:`HeadLayout` of every layer that loses a head.

    Raises :class:`HeadatlasError` for unknown head ids, or when a layer would lose all its
    heads and ``allow_empty_layers`` is off.
    """
    group = n_heads // n_kv_heads
    by_layer: dict[int, set[int]] = {}
    for layer, head in removed:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise HeadatlasError(
                f"no head L{layer}.H{head}: the model has {n_layers} layers × {n_heads} heads"
            )
        by_layer.setdefault(layer, set()).add(head)
    layouts: dict[int, HeadLayout] = {}
    for layer, gone in sorted(by_layer.items()):
        kept = {
            kv: [h for h in range(kv * group, (kv + 1) * group) if h not in gone] for kv in range(n_kv_heads)
        }
        groups = {kv: heads for kv, heads in kept.items() if heads}
        if not groups:
            if not allow_empty_layers:
                raise HeadatlasError(
                    f"pruning would remove every head of layer {layer}: keep one or pass --allow-empty-layers"
                )
            layouts[layer] = HeadLayout((0,), (False,), (0,))
            continue
        width = max(len(h) for h in groups.values())
        slots: list[int] = []
        live: list[bool] = []
        for kv, heads in groups.items():
            pad = [h for h in range(kv * group, (kv + 1) * group) if h in gone][: width - len(heads)]
            order = sorted(heads + pad)
            slots.extend(order)
            live.extend(h not in gone for h in order)
        layouts[layer] = HeadLayout(tuple(slots), tuple(live), tuple(groups))
    return layouts


def _rows(head_ids: Iterable[int], head_dim: int) -> torch.Tensor:
    idx = [h * head_dim + i for h in head_ids for i in range(head_dim)]
    return torch.tensor(idx, dtype=torch.long)


def _sliced_linear(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A new ``nn.Linear`` keeping ``index`` along ``dim`` of the weight (0: outputs, 1: inputs)."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))  # [out, in]
    out_f, in_f = weight.shape
    new = torch.nn.Linear(in_f, out_f, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None and new.bias is not None:
            bias = linear.bias.detach()
            new.bias.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def attention_modules(model: PreTrainedModel) -> dict[int, torch.nn.Module]:
    """Return ``{layer: attention module}`` (the parent of each output projection).

    Raises :class:`HeadatlasError` for families without separate ``q/k/v/o`` projections.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    spec = arch_spec(str(config.model_type))
    if spec.attn_proj is None:
        raise HeadatlasError(
            f"head pruning does not support {config.model_type!r} models (fused or shared projections): "
            "it needs separate q/k/v/o projections (llama, mistral, qwen2/3, gemma families)"
        )
    found: dict[int, torch.nn.Module] = {}
    modules = dict(model.named_modules())
    for name in modules:
        layer = match_layer(spec.o_proj, name) if in_text_stack(name) else None
        if layer is not None and layer not in found:
            found[layer] = modules[name.rsplit(".", 1)[0]]
    return found


def apply_layouts(model: PreTrainedModel, layouts: dict[int, HeadLayout], head_dim: int) -> None:
    """Replace the projections of ``model`` (in place) so each layer matches its layout.

    ``model`` must have the original (unpruned) shapes. Dead slots get zero ``o_proj`` columns.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    q_name, k_name, v_name, o_name = arch_spec(str(config.model_type)).attn_proj or ("", "", "", "")
    modules = attention_modules(model)
    for layer, layout in layouts.items():
        attn = modules[layer]
        q_rows = _rows(layout.slots, head_dim)  # [slots * d_head]
        kv_rows = _rows(layout.kv_heads, head_dim)  # [kv_head * d_head]
        setattr(attn, q_name, _sliced_linear(getattr(attn, q_name), q_rows, 0))
        setattr(attn, k_name, _sliced_linear(getattr(attn, k_name), kv_rows, 0))
        setattr(attn, v_name, _sliced_linear(getattr(attn, v_name), kv_rows, 0))
        o_proj = _sliced_linear(getattr(attn, o_name), q_rows, 1)
        with torch.no_grad():
            for slot, alive in enumerate(layout.live):
                if not alive:
                    o_proj.weight[:, slot * head_dim : (slot + 1) * head_dim] = 0.0
        setattr(attn, o_name, o_proj)
        setattr(attn, "num_key_value_groups", layout.group)  # noqa: B010 (attribute of a Module)
        for attr, value in (("num_heads", len(layout.slots)), ("num_key_value_heads", len(layout.kv_heads))):
            if hasattr(attn, attr):
                setattr(attn, attr, value)


def uniform_shape(
    layouts: dict[int, HeadLayout], n_layers: int, n_heads: int, n_kv_heads: int
) -> tuple[int, int] | None:
    """Return ``(n_slots, n_kv)`` when every layer (pruned or not) has that shape, else ``None``."""
    shapes = {
        (len(layouts[i].slots), len(layouts[i].kv_heads)) if i in layouts else (n_heads, n_kv_heads)
        for i in range(n_layers)
    }
    return next(iter(shapes)) if len(shapes) == 1 else None


def layouts_from_config(config: Any) -> dict[int, HeadLayout] | None:
    """Read the per-layer layouts stored by a pruned checkpoint, if any need rebuilding at load time."""
    data = getattr(config, CONFIG_KEY, None)
    if not isinstance(data, dict) or data.get("uniform"):
        return None
    return {int(k): HeadLayout.from_dict(v) for k, v in data.get("layers", {}).items()}


def record_layouts(
    model: PreTrainedModel,
    layouts: dict[int, HeadLayout],
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
) -> bool:
    """Store ``layouts`` in ``model.config``; return whether plain transformers can reload it.

    With a uniform shape the config's ``num_attention_heads``/``num_key_value_heads`` become the
    new counts (``head_dim`` is pinned) and no special loader is needed.
    """
    config = model.config
    shape = uniform_shape(layouts, n_layers, n_heads, n_kv_heads)
    data = {
        "version": 1,
        "uniform": shape is not None,
        "layers": {str(k): v.to_dict() for k, v in layouts.items()},
    }
    if shape is not None:
        config.head_dim = head_dim
        config.num_attention_heads, config.num_key_value_heads = shape
    setattr(config, CONFIG_KEY, data)
    return shape is not None
