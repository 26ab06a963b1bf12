"""The one hook on head outputs: read or replace ``z [batch, query, head, d_head]`` of any layer.

The input of a layer's attention output projection (``o_proj`` in Llama, ``c_proj`` in GPT-2, the
attention output ``dense`` in BERT) is the concatenation of per-head outputs, whatever attention
backend produced it (SDPA, eager, flash, headatlas). So one forward pre-hook there sees every
query head's output — the place of Michel et al. 2019's head gate, of Wang et al. 2022's mean
ablation and of Li et al. 2023's inference-time intervention — and everything in headatlas that
reads or writes head outputs goes through :func:`head_outputs`: ablation, gates, head means,
output similarity, copying scores, and the apps built on them.

A callback receives ``(layer, z, context)``: ``z`` is a view of the layer's head outputs (never
modify it in place) and ``context`` is whatever the caller set on the :class:`HeadTap` for the
current batch. It returns ``None`` to leave the outputs as they are, or a tensor of ``z``'s shape
to replace them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..core.errors import HeadatlasError
from ..model.archs import arch_spec, in_text_stack, match_layer, projections_by_structure
from ..model.info import LoadedModel, check_loaded

HeadCallback = Callable[[int, torch.Tensor, Any], "torch.Tensor | None"]
"""``(layer, z [batch, query, head, d_head], context) -> replacement z or None``."""


def check_heads_supported(loaded: LoadedModel) -> None:
    """Raise :class:`HeadatlasError` when the architecture table refuses this family's heads."""
    reason = arch_spec(loaded.info.arch).refused
    if reason is not None:
        raise HeadatlasError(f"{loaded.info.arch}: {reason}")


def output_projections(loaded: LoadedModel) -> dict[int, torch.nn.Module]:
    """Return ``{layer: attention output projection}`` found by the architecture table's patterns,
    else by structure (:func:`~headatlas.model.archs.projections_by_structure`: the linear child of
    each attention module that reads the concatenated heads and writes the residual stream)."""
    check_heads_supported(loaded)
    spec = arch_spec(loaded.info.arch)
    found: dict[int, torch.nn.Module] = {}
    modules = dict(loaded.model.named_modules())
    for name, module in modules.items():
        layer = match_layer(spec.o_proj, name) if in_text_stack(name) else None
        if layer is not None and layer not in found:
            found[layer] = module
    if not found:
        config = loaded.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = next(
            (v for k in ("hidden_size", "n_embd", "d_model") if isinstance(v := getattr(text, k, None), int)),
            0,
        )
        width = loaded.info.n_heads * loaded.info.head_dim
        found = {
            layer: modules[name]
            for layer, name in projections_by_structure(loaded.model, width, hidden).items()
        }
    if not found:
        raise HeadatlasError(
            f"cannot find the attention output projections of a {loaded.info.arch!r} model (no pattern "
            "matches and no attention module has a linear child reading the concatenated heads): "
            "add a row for it to headatlas.model.archs.ARCHITECTURES"
        )
    return found


def output_weight(module: torch.nn.Module) -> torch.Tensor:
    """Return an output projection's weight as ``[d_model, head * d_head]`` (detached, not copied).

    ``nn.Linear`` stores it that way; GPT-2's ``Conv1D`` stores the transpose.
    """
    weight = torch.as_tensor(module.weight).detach()
    return weight.t() if type(module).__name__ == "Conv1D" else weight


class HeadTap:
    """The handle :func:`head_outputs` yields: set :attr:`context` before each forward pass."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = layers
        """The hooked layers, in order."""
        self.context: Any = None
        """Passed to the callback as its third argument (per-batch data: masks, targets, ...)."""


def _split(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    if x.shape[-1] % head_dim:
        raise HeadatlasError(
            f"the attention output projection's input has {x.shape[-1]} features, not a multiple of "
            f"head_dim {head_dim}: this model's head outputs cannot be read"
        )
    return x.view(*x.shape[:-1], x.shape[-1] // head_dim, head_dim)  # [batch, query, head, d_head]


@contextmanager
def head_outputs(
    loaded: LoadedModel, callback: HeadCallback, layers: Iterable[int] | None = None
) -> Iterator[HeadTap]:
    """Within the ``with`` block, hand every head's output of ``layers`` (all when ``None``) to
    ``callback`` on each forward pass, and use its return value (if any) in their place.

    Yields a :class:`HeadTap` whose ``context`` reaches the callback. Hooks are removed on exit,
    also on error; weights are never touched. Works with every attention backend, GQA/MQA
    included (outputs are per query head), and with gradients (a replacement may depend on
    tensors that require grad). Raises :class:`HeadatlasError` for a layer without a projection.
    """
    check_loaded(loaded).info.require_one_stack(
        "reading or writing head outputs (ablation, importance, patching, probes)"
    )
    projections = output_projections(loaded)
    chosen = sorted(projections) if layers is None else sorted(set(layers))
    missing = [layer for layer in chosen if layer not in projections]
    if missing:
        raise HeadatlasError(f"layer {missing[0]} has no attention output projection to hook")
    tap = HeadTap(chosen)
    head_dim = loaded.info.head_dim

    def make_hook(layer: int) -> Any:
        def hook(
            _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            positional = bool(args)
            x = args[0] if positional else kwargs["input"]  # [batch, query, head * d_head]
            z = _split(x, head_dim)  # [batch, query, head, d_head]
            replaced = callback(layer, z, tap.context)
            if replaced is None:
                return None
            if replaced.shape != z.shape:
                raise HeadatlasError(
                    f"a head-output callback returned {tuple(replaced.shape)} for layer {layer}, "
                    f"expected {tuple(z.shape)}"
                )
            new = replaced.to(x.dtype).reshape(x.shape)  # [batch, query, head * d_head]
            if positional:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "input": new}

        return hook

    handles = []
    try:
        for layer in chosen:
            handles.append(projections[layer].register_forward_pre_hook(make_hook(layer), with_kwargs=True))
        yield tap
    finally:
        for handle in handles:
            handle.remove()
