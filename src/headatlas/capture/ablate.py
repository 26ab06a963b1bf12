"""Silence chosen query heads by hooking the input of each layer's attention output projection.

The input of the output projection (``o_proj`` in Llama, ``c_proj`` in GPT-2, the attention
output ``dense`` in BERT) is the concatenation of per-head outputs ``[batch, query, head * d_head]``,
whatever attention backend produced it, so the same hook works for SDPA, eager, flash or headatlas.
This is the head gate of Michel et al. 2019 ("Are Sixteen Heads Really Better than One?") set
to 0 (``mode="zero"``), or mean ablation (``mode="mean"``), which replaces the head's output by
its mean over positions, keeping its average contribution while removing token-specific
information (Wang et al. 2022, "Interpretability in the Wild").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ..archs import arch_spec, match_layer
from ..errors import HeadatlasError

if TYPE_CHECKING:
    from ..loading import LoadedModel

MODES = ("zero", "mean")


def output_projections(loaded: LoadedModel) -> dict[int, torch.nn.Module]:
    """Return ``{layer: output projection module}`` found by the architecture table's patterns."""
    spec = arch_spec(loaded.info.arch)
    found: dict[int, torch.nn.Module] = {}
    for name, module in loaded.model.named_modules():
        layer = match_layer(spec.o_proj, name)
        if layer is not None and layer not in found:
            found[layer] = module
    if not found:
        raise HeadatlasError(
            f"cannot find the attention output projections of a {loaded.info.arch!r} model: "
            "add a row for it to headatlas.archs.ARCHITECTURES"
        )
    return found


def _parse_heads(heads: Iterable[tuple[int, int]], n_layers: int, n_heads: int) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise HeadatlasError(
                f"no head L{layer}.H{head}: the model has {n_layers} layers × {n_heads} heads"
            )
        by_layer.setdefault(layer, []).append(head)
    return by_layer


@contextmanager
def ablate(
    loaded: LoadedModel,
    heads: Iterable[tuple[int, int]],
    mode: str = "zero",
    means: dict[tuple[int, int], torch.Tensor] | None = None,
) -> Iterator[None]:
    """Within the ``with`` block, silence query heads ``heads`` (``(layer, head)`` pairs).

    ``mode="zero"`` sets each head's output to 0. ``mode="mean"`` sets it to ``means[(layer,
    head)]`` (``[d_head]``) when given, else to its mean over the batch's positions in the current
    forward pass. Hooks are removed on exit, also on error. The model's weights are not touched.
    """
    if mode not in MODES:
        raise HeadatlasError(f"unknown ablation mode {mode!r}: use 'zero' or 'mean'")
    info = loaded.info
    by_layer = _parse_heads(heads, info.n_layers, info.n_heads)
    projections = output_projections(loaded)
    handles = []

    def make_hook(layer: int, chosen: list[int]) -> Any:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]  # [batch, query, head * d_head]
            split = x.reshape(*x.shape[:-1], info.n_heads, -1).clone()  # [batch, query, head, d_head]
            for head in chosen:
                if mode == "zero":
                    split[..., head, :] = 0.0
                elif means is not None and (layer, head) in means:
                    split[..., head, :] = means[(layer, head)].to(split)
                else:
                    split[..., head, :] = split[..., head, :].mean(dim=(0, 1), keepdim=True)
            return (split.reshape(x.shape), *args[1:])

        return hook

    try:
        for layer, chosen in by_layer.items():
            if layer not in projections:
                raise HeadatlasError(f"layer {layer} has no attention output projection to hook")
            handles.append(projections[layer].register_forward_pre_hook(make_hook(layer, chosen)))
        yield
    finally:
        for handle in handles:
            handle.remove()
