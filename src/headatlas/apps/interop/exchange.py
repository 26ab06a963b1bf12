"""An atlas in other tools' formats and back: ``headatlas export`` and ``headatlas import``.

:mod:`headatlas.apps.common.formats` reads and writes the files on plain arrays; this module maps them
onto atlases. Export takes one score column. Import maps a foreign file onto an atlas of the named
model (layers × heads checked): KV-head formats (DuoAttention) are expanded to their query heads
and marked as such; a head list (Attention Tracker) becomes a 0/1 column. ``atlas.json`` records
under ``imported`` where each imported column came from (format, file, its sha256, whether it was
expanded from KV heads, and the atlas score whose task measures it, so ``verify`` can check it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ...atlas.table import Atlas
from ...core.errors import HeadatlasError, check_at_least, check_number, param
from ...core.outputs import check_output_file, check_output_folder
from ...core.scores import SCORES
from ..common.formats import (
    DUO_FOLDER,
    FORMATS,
    check_format,
    read_attention_tracker,
    read_duo,
    read_headkv,
    read_scores_csv,
    write_attention_tracker,
    write_duo,
    write_headkv,
    write_scores_csv,
)
from ..common.kv_heads import kv_head_scores

FORMAT_NAMES = tuple(FORMATS)
"""Formats ``export`` writes and ``import`` reads."""
DEFAULT_LIKE = {"retrieval-head": "retrieval", "headkv": "retrieval", "duo": "retrieval"}
"""The atlas score whose task measures an imported column, by format (``verify`` runs that task)."""


def kv_gates(atlas: Atlas, score: str) -> np.ndarray:
    """Return ``[layer, kv_head]`` gates in [0, 1] from ``score``: the KV-head scores ``kv plan``
    ranks by (:func:`~headatlas.apps.common.kv_heads.kv_head_scores`: each head relative to the
    model's strongest, the max over a KV head's query heads, clipped to [0, 1])."""
    return kv_head_scores(atlas, [score], name="score")


def top_heads(atlas: Atlas, score: str, k: int | None, threshold: float | None) -> list[tuple[int, int]]:
    """Return the heads with ``score`` ≥ ``threshold``, else the ``k`` highest, ordered by score."""
    if threshold is None:
        check_at_least("k", k if k is not None else 0, 1)
        rows = atlas.top(score, int(k or 0))
    else:
        atlas.check_score(score)
        rows = atlas.table[atlas.table[score] >= threshold].sort_values(score, ascending=False)
    return [
        (int(layer), int(head))
        for layer, head in zip(rows["layer"].tolist(), rows["head"].tolist(), strict=True)
    ]


def check_export_target(fmt: str, out: str | Path, force: bool = False) -> None:
    """Raise :class:`HeadatlasError` unless ``out`` can take format ``fmt`` (a DuoAttention pattern
    folder for ``duo``, never a model's directory; a ``.json`` or ``.csv`` file otherwise), before
    any work (:mod:`headatlas.core.outputs`)."""
    check_format(fmt)
    if fmt == "duo":
        check_output_folder(out, DUO_FOLDER, force)
    else:
        check_output_file(out, (".csv",) if fmt == "csv" else (".json",), force=force)


def export_atlas(
    atlas: Atlas,
    fmt: str,
    score: str,
    out: str | Path,
    k: int | None = None,
    threshold: float | None = None,
    sink: int | None = None,
    recent: int | None = None,
) -> Path:
    """Write ``score`` of ``atlas`` in format ``fmt`` to ``out``; return what was written.

    ``duo``: a directory of KV-head gates (:func:`kv_gates`) with ``sink`` (default 64) and
    ``recent`` (default 256); ``attention-tracker``: the heads of :func:`top_heads` (``k``, default
    10, or ``threshold``); the others: one score per head. A setting the format does not use is
    refused.
    """
    check_format(fmt)
    atlas.check_score(score)
    used = {"duo": ("sink", "recent"), "attention-tracker": ("k", "threshold")}.get(fmt, ())
    given = {"k": k, "threshold": threshold, "sink": sink, "recent": recent}
    unused = [name for name, value in given.items() if value is not None and name not in used]
    if unused:
        raise HeadatlasError(f"{param(unused[0])} does not apply to {param('format')} {fmt}: leave it out")
    if fmt == "duo":
        sink, recent = 64 if sink is None else sink, 256 if recent is None else recent
        check_at_least("sink", sink, 0)
        check_at_least("recent", recent, 1)
        return write_duo(out, kv_gates(atlas, score), sink, recent)
    if fmt == "attention-tracker":
        if k is not None and threshold is not None:
            raise HeadatlasError(f"give {param('k')} or {param('threshold')}, not both")
        if threshold is not None:
            check_number("threshold", threshold)
        heads = top_heads(atlas, score, 10 if k is None and threshold is None else k, threshold)
        if not heads:
            raise HeadatlasError(f"no head has {score} ≥ {param('threshold')} {threshold:g}: lower it")
        return write_attention_tracker(out, heads, atlas.model.name)
    if fmt == "csv":
        return write_scores_csv(out, atlas.matrix(score))
    return write_headkv(out, atlas.matrix(score))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()


def read_annotation(path: str | Path, fmt: str, n_layers: int, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """Return the foreign file ``path`` as ``[layer, head]`` values for a model of that shape (KV
    formats expanded to query heads; a head list as 1.0 for listed heads, 0.0 for the others)."""
    check_format(fmt)
    where = str(path)
    if fmt == "duo":
        gates = read_duo(path).gates  # [layer, kv_head]
        if gates.shape != (n_layers, n_kv_heads):
            raise HeadatlasError(
                f"{where!r} has {gates.shape[0]} layers × {gates.shape[1]} KV heads; the model has "
                f"{n_layers} × {n_kv_heads}"
            )
        return np.repeat(gates, n_heads // n_kv_heads, axis=1)  # [layer, head]
    if fmt == "attention-tracker":
        values = np.zeros((n_layers, n_heads))
        for layer, head in read_attention_tracker(path):
            if layer >= n_layers or head >= n_heads:
                raise HeadatlasError(
                    f"{where!r} lists L{layer}H{head}; the model has {n_layers} × {n_heads} heads"
                )
            values[layer, head] = 1.0
        return values
    reader = read_scores_csv if fmt == "csv" else read_headkv
    values = reader(path)
    if values.shape[0] > n_layers or values.shape[1] > n_heads:
        raise HeadatlasError(
            f"{where!r} has heads up to {values.shape[0]} layers × {values.shape[1]} heads; the model has "
            f"{n_layers} × {n_heads}"
        )
    full = np.full((n_layers, n_heads), np.nan)
    full[: values.shape[0], : values.shape[1]] = values
    return full


def import_annotation(
    atlas: Atlas, path: str | Path, fmt: str, name: str | None = None, like: str | None = None
) -> str:
    """Add the foreign file ``path`` (format ``fmt``) to ``atlas`` as column ``name`` (default
    ``imported_<format>``) and record where it came from; return the column name.

    ``like``: the atlas score whose task measures it (``verify`` runs that task; default: by
    format, ``retrieval`` for the retrieval-head, headkv and duo formats).
    """
    column = name or "imported_" + fmt.replace("-", "_")
    if not column.isidentifier() or column != column.lower():
        raise HeadatlasError(f"{param('name')} {column!r} must be a new lower-case column name")
    imported = atlas.meta.get("imported", {})
    taken = column in atlas.table.columns or f"{column}_n" in atlas.table.columns
    if taken and column not in imported:  # a measured score or an id: never replaced by an import
        raise HeadatlasError(
            f"{param('name')} {column!r} is already a column of this atlas (not an imported one): give a new name"
        )
    like = like if like is not None else DEFAULT_LIKE.get(fmt)
    if like is not None and like not in SCORES:
        raise HeadatlasError(f"unknown {param('like')} score {like!r}")
    model = atlas.model
    values = read_annotation(path, fmt, model.n_layers, model.n_heads, model.n_kv_heads)
    atlas.set_matrix(column, values)
    source = Path(path)
    atlas.meta.setdefault("imported", {})[column] = {
        "format": fmt,
        "path": str(source.resolve()),
        "sha256": _file_sha256(source),
        "expanded_from_kv_heads": fmt == "duo",
        "like": like,
    }
    return column
