"""Per-head features for probes and steering: the output of every head at an item's positions,
through the one head-output hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...batteries.base import ProbeSequence, make_batch, pad_id
from ...capture import head_outputs, padded_positions
from ...core.errors import HeadatlasError, check_at_least
from ...model.info import LoadedModel
from ...model.load import load
from .probe_tasks import ProbeItem


def collect_features(loaded: LoadedModel, items: Sequence[ProbeItem], batch_size: int = 16) -> torch.Tensor:
    """Return every head's output at the items' labelled positions, ``[layer * head, n, d_head]``
    (float32, group index ``layer * n_heads + head``; ``n`` = positions in item order)."""
    info = loaded.info
    pad = pad_id(loaded.tokenizer)
    device = loaded.device
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(info.n_layers)}

    def keep(layer: int, z: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor]) -> None:
        rows, cols = where
        per_layer[layer].append(z[rows, cols].float().cpu())  # [n_batch_positions, head, d_head]

    with head_outputs(loaded, keep) as tap, torch.no_grad():
        for start in range(0, len(items), batch_size):
            part = items[start : start + batch_size]
            batch = make_batch([ProbeSequence(item.ids) for item in part], pad)
            width = batch.input_ids.shape[1]
            rows = [r for r, item in enumerate(part) for _ in item.positions]
            cols = [width - len(item.ids) + p for item in part for p in item.positions]
            tap.context = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
            mask = batch.attention_mask.to(device)
            loaded.model(
                input_ids=batch.input_ids.to(device),
                attention_mask=mask,
                **padded_positions(loaded.model, mask),
            )
    stacked = torch.stack([torch.cat(per_layer[layer]) for layer in range(info.n_layers)])
    # stacked: [layer, n, head, d_head]
    return stacked.permute(0, 2, 1, 3).reshape(info.n_layers * info.n_heads, -1, info.head_dim).contiguous()


def random_init_copy(loaded: LoadedModel, seed: int) -> LoadedModel:
    """Return a randomly initialised model of ``loaded``'s architecture and config (weights from
    ``torch.manual_seed(seed)``), with the same tokenizer: the baseline of probing controls."""
    torch.manual_seed(seed)
    fresh: Any = type(loaded.model)(loaded.model.config)
    fresh = fresh.to(device=loaded.device, dtype=next(loaded.model.parameters()).dtype)
    return load(fresh.eval(), tokenizer=loaded.tokenizer)


def bad_heads(loaded: LoadedModel, k: int) -> None:
    """Raise :class:`HeadatlasError` unless ``1 ≤ k ≤`` the model's number of heads."""
    total = loaded.info.n_layers * loaded.info.n_heads
    check_at_least("k", k, 1)
    if k > total:
        from ...core.errors import param

        raise HeadatlasError(f"{param('k')} {k} is larger than the model's {total} heads")
