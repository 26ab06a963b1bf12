"""Open the atlas an app writes into, checking that it belongs to the same model.

Writing into a directory that already holds an atlas adds or replaces columns. A directory
without an atlas gets a minimal one (``layer``, ``head``, ``kv_head``, an empty ``roles``
column and the model's metadata), so :meth:`headatlas.Atlas.load`, ``headatlas show`` and later
scans of other columns all work on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..atlas import TABLE_FILE, Atlas, _versions, check_same_model
from ..errors import HeadatlasError

__all__ = ["check_same_model", "column_matrix", "minimal_atlas", "open_atlas", "set_column"]
from ..loading import LoadedModel


def minimal_atlas(loaded: LoadedModel) -> Atlas:
    """An atlas with one row per head and no scores yet."""
    info = loaded.info
    layers, heads = np.meshgrid(np.arange(info.n_layers), np.arange(info.n_heads), indexing="ij")
    table = pd.DataFrame(
        {
            "layer": layers.ravel(),
            "head": heads.ravel(),
            "kv_head": heads.ravel() // info.group_size,
            "roles": [""] * (info.n_layers * info.n_heads),
        }
    )
    return Atlas(table, {"model": info.to_dict(), "versions": _versions()})


def open_atlas(loaded: LoadedModel, directory: str | Path | None) -> Atlas:
    """Return the atlas in ``directory`` (checked against ``loaded``), or a new minimal one."""
    if directory is None or not (Path(directory) / TABLE_FILE).exists():
        return minimal_atlas(loaded)
    atlas = Atlas.load(directory)
    check_same_model(atlas, loaded, str(directory))
    return atlas


def set_column(atlas: Atlas, name: str, values: np.ndarray) -> None:
    """Set ``name`` from a ``[layer, head]`` array, aligned on the table's layer/head columns."""
    layers = atlas.table["layer"].to_numpy(dtype=int)
    heads = atlas.table["head"].to_numpy(dtype=int)
    atlas.table[name] = np.asarray(values)[layers, heads]


def column_matrix(atlas: Atlas, name: str, n_layers: int, n_heads: int) -> np.ndarray:
    """Return column ``name`` as a ``[layer, head]`` array; raise if it is missing."""
    if name not in atlas.table.columns:
        raise HeadatlasError(
            f"the atlas has no column {name!r}: choose from {', '.join(atlas.table.columns)}"
        )
    out = np.full((n_layers, n_heads), np.nan)
    values = pd.to_numeric(atlas.table[name], errors="coerce").to_numpy(dtype=float)
    out[atlas.table["layer"].to_numpy(dtype=int), atlas.table["head"].to_numpy(dtype=int)] = values
    return out
