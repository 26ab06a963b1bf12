"""Silence chosen query heads, on the one head-output hook (:func:`~.hook.head_outputs`).

This is the head gate of Michel et al. 2019 ("Are Sixteen Heads Really Better than One?") set
to 0 (``mode="zero"``), or mean ablation (``mode="mean"``), which replaces the head's output by
its mean over positions, keeping its average contribution while removing token-specific
information (Wang et al. 2022, "Interpretability in the Wild"). It works for SDPA, eager, flash
or headatlas attention alike, because the hook sits on the input of the output projection.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..core.errors import check_choice
from ..core.heads import Head, check_heads, heads_by_layer
from ..model.info import LoadedModel, check_loaded
from .hook import head_outputs

MODES = ("zero", "mean")
"""Ablation modes."""


def check_mode(mode: str) -> None:
    """Raise :class:`~headatlas.core.errors.HeadatlasError` unless ``mode`` is an ablation mode."""
    check_choice("mode", mode, MODES)


@contextmanager
def ablate(
    loaded: LoadedModel,
    heads: Iterable[Head | str] | str,
    mode: str = "zero",
    means: dict[Head, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Within the ``with`` block, silence query heads ``heads`` (``(layer, head)`` pairs or names such
    as ``"L3H1"``).

    ``mode="zero"`` sets each head's output to 0. ``mode="mean"`` sets it to ``means[(layer,
    head)]`` (``[d_head]``) when given, else to its mean over the batch's positions in the current
    forward pass. Hooks are removed on exit, also on error. The model's weights are not touched.
    """
    check_mode(mode)
    info = check_loaded(loaded).info
    by_layer = heads_by_layer(check_heads(heads, info.n_layers, info.n_heads))

    def silence(layer: int, z: torch.Tensor, _context: Any) -> torch.Tensor:
        out = z.clone()  # [batch, query, head, d_head]
        for head in by_layer[layer]:
            if mode == "zero":
                out[..., head, :] = 0.0
            elif means is not None and (layer, head) in means:
                out[..., head, :] = means[(layer, head)].to(out)
            else:
                out[..., head, :] = z[..., head, :].mean(dim=(0, 1), keepdim=True)
        return out

    if not by_layer:
        yield
        return
    with head_outputs(loaded, silence, layers=by_layer):
        yield
