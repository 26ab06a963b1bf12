"""Foreign head-annotation formats: the one place that reads and writes other tools' files.

No shared format for per-head annotations exists; each tool ships its own. Each format here is a
reader and a writer on plain arrays (``[layer, kv_head]`` or ``[layer, head]``), registered in
:data:`FORMATS`, so plans, atlases and later apps convert to and from them without knowing the
files' layout.

- ``duo``: DuoAttention (Xiao et al. 2024) and kvpress's ``DuoAttentionPress``: a directory with
  ``full_attention_heads.tsv`` (one row per layer, one tab-separated float in [0, 1] per KV head;
  1 = full attention, read with a 0.5 threshold or a quantile) and ``config.json`` with
  ``sink_size`` and ``recent_size``.
- ``headkv``: Retrieval_Head (Wu et al. 2024) and HeadKV (Fu et al. 2024): one JSON object
  ``{"L-H": [score, ...]}`` per query head (layer ``L``, head ``H``), a list of per-sample scores
  whose mean is the head's score. ``retrieval-head`` is the same layout under Retrieval_Head's name.
- ``attention-tracker``: Attention Tracker (Hung et al. 2024) model configs, JSON with
  ``params.important_heads`` ``[[layer, head], ...]``.
- ``csv``: one row per head, ``layer,head,score``, the layout of MAPS's (Elhelo & Geva 2024)
  per-operation ``scores.csv``.

Atlas-level export and import (scores to formats and back, KV heads expanded) are in
:mod:`headatlas.apps.interop.exchange`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import HeadatlasError, param
from ...core.outputs import Folder
from ...core.storage import atomic_path

DUO_TSV = "full_attention_heads.tsv"
DUO_CONFIG = "config.json"
DUO_FOLDER = Folder("a DuoAttention export", DUO_TSV)
"""A DuoAttention pattern folder; its ``config.json`` is the pattern's, never a model's."""
_HEAD_KEY = re.compile(r"^(\d+)-(\d+)$")


@dataclass(frozen=True)
class DuoPattern:
    """A DuoAttention pattern: ``gates [layer, kv_head]`` in [0, 1] and the streaming window."""

    gates: np.ndarray
    sink: int
    recent: int

    def full_heads(self, threshold: float = 0.5) -> list[list[int]]:
        """KV heads per layer whose gate is at least ``threshold`` (DuoAttention's deployment rule)."""
        return [[int(k) for k in np.flatnonzero(row >= threshold)] for row in self.gates]


def write_duo(directory: str | Path, gates: np.ndarray, sink: int, recent: int) -> Path:
    """Write ``gates [layer, kv_head]`` as DuoAttention's ``full_attention_heads.tsv`` + ``config.json``
    in ``directory`` (both files complete or neither replaced); return the directory."""
    gates = np.asarray(gates, dtype=float)
    if gates.ndim != 2 or not np.isfinite(gates).all() or gates.min() < 0 or gates.max() > 1:
        raise HeadatlasError("DuoAttention gates must be a finite [layer, kv_head] array in [0, 1]")
    out = Path(directory)
    text = "".join("\t".join(f"{v:.6f}" for v in row) + "\n" for row in gates)
    config = json.dumps({"sink_size": int(sink), "recent_size": int(recent)}, indent=1) + "\n"
    with atomic_path(out / DUO_TSV) as tsv, atomic_path(out / DUO_CONFIG) as cfg:
        tsv.write_text(text)
        cfg.write_text(config)
    return out


def read_duo(directory: str | Path) -> DuoPattern:
    """Read a DuoAttention pattern directory (``full_attention_heads.tsv`` + ``config.json``)."""
    where = Path(directory)
    try:
        rows = [line.split("\t") for line in (where / DUO_TSV).read_text().splitlines() if line.strip()]
        gates = np.array([[float(v) for v in row] for row in rows], dtype=float)
        config = json.loads((where / DUO_CONFIG).read_text())
        sink, recent = int(config["sink_size"]), int(config["recent_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise HeadatlasError(f"{str(where)!r} is not a DuoAttention pattern directory: {error}") from None
    if gates.ndim != 2 or len({len(r) for r in rows}) != 1:
        raise HeadatlasError(f"{str(where / DUO_TSV)!r}: every row needs the same number of KV heads")
    return DuoPattern(np.clip(gates, 0.0, 1.0), sink, recent)


def write_headkv(path: str | Path, scores: np.ndarray, samples: np.ndarray | None = None) -> Path:
    """Write ``scores [layer, head]`` as Retrieval_Head / HeadKV JSON ``{"L-H": [score, ...]}``.

    ``samples [layer, head, n]`` (optional) are per-sample scores; without them each list holds
    the one mean score. NaN (a head not scored) is written as 0.0, as those tools expect numbers.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2:
        raise HeadatlasError("HeadKV scores must be a [layer, head] array")
    data: dict[str, list[float]] = {}
    for layer, head in np.ndindex(*scores.shape):
        values = samples[layer, head] if samples is not None else [scores[layer, head]]
        data[f"{layer}-{head}"] = [0.0 if math.isnan(v) else round(float(v), 6) for v in values]
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data))
    return target


def read_headkv(path: str | Path, n_layers: int | None = None, n_heads: int | None = None) -> np.ndarray:
    """Read Retrieval_Head / HeadKV JSON into ``[layer, head]`` mean scores (NaN for missing heads)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise HeadatlasError(f"cannot read the head-score JSON {str(path)!r}: {error}") from None
    if not isinstance(data, dict) or not data:
        raise HeadatlasError(f"{str(path)!r} is not a {{'L-H': [scores]}} head-score JSON")
    cells: dict[tuple[int, int], float] = {}
    for key, values in data.items():
        match = _HEAD_KEY.match(str(key))
        if match is None or not isinstance(values, list) or not values:
            raise HeadatlasError(f"{str(path)!r}: entry {key!r} is not 'layer-head': [scores]")
        cells[(int(match[1]), int(match[2]))] = float(np.mean([float(v) for v in values]))
    rows = n_layers or 1 + max(layer for layer, _ in cells)
    cols = n_heads or 1 + max(head for _, head in cells)
    out = np.full((rows, cols), np.nan)
    for (layer, head), value in cells.items():
        if layer >= rows or head >= cols:
            raise HeadatlasError(
                f"{str(path)!r}: head {layer}-{head} is outside {rows} layers × {cols} heads"
            )
        out[layer, head] = value
    return out


# ---------------------------------------------------------------- Attention Tracker, score CSV

TRACKER_PROVIDER = "attn-hf"


def write_attention_tracker(
    path: str | Path,
    heads: list[tuple[int, int]],
    name: str,
    model_id: str | None = None,
    threshold: float | None = None,
) -> Path:
    """Write ``heads`` as an Attention-Tracker model config (Hung et al. 2024): JSON with
    ``model_info`` (provider, name, model id) and ``params.important_heads`` ``[[layer, head], ...]``;
    return the path."""
    config: dict[str, dict[str, Any]] = {
        "model_info": {"provider": TRACKER_PROVIDER, "name": name, "model_id": model_id or name},
        "params": {
            "temperature": 0.1,
            "max_output_tokens": 32,
            "important_heads": [[int(layer), int(head)] for layer, head in heads],
        },
    }
    if threshold is not None:  # a calibrated focus threshold (headatlas guard), not in the original configs
        config["params"]["threshold"] = float(threshold)
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(config, indent=4) + "\n")
    return target


def read_attention_tracker(path: str | Path) -> list[tuple[int, int]]:
    """Read an Attention-Tracker model config; return its important heads as ``(layer, head)`` pairs."""
    try:
        config = json.loads(Path(path).read_text())
        heads = config["params"]["important_heads"]
        pairs = [(int(pair[0]), int(pair[1])) for pair in heads]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise HeadatlasError(
            f"{str(path)!r} is not an Attention-Tracker config with params.important_heads [[L, H], ...]: {error}"
        ) from None
    if any(layer < 0 or head < 0 or len(pair) != 2 for (layer, head), pair in zip(pairs, heads, strict=True)):
        raise HeadatlasError(
            f"{str(path)!r}: important_heads must be [layer, head] pairs of non-negative integers"
        )
    return pairs


CSV_HEADER = "layer,head,score"


def write_scores_csv(path: str | Path, scores: np.ndarray) -> Path:
    """Write ``scores [layer, head]`` as a CSV with one row per head, ``layer,head,score`` (the
    one-score-per-head layout of MAPS's per-operation ``scores.csv``; NaN as an empty cell)."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2:
        raise HeadatlasError("a score CSV needs a [layer, head] array")
    lines = [CSV_HEADER] + [
        f"{layer},{head},{'' if math.isnan(v) else repr(round(float(v), 8))}"
        for (layer, head), v in np.ndenumerate(scores)
    ]
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return target


def read_scores_csv(path: str | Path, n_layers: int | None = None, n_heads: int | None = None) -> np.ndarray:
    """Read a per-head score CSV into ``[layer, head]`` (NaN for heads it does not list).

    The file needs ``layer`` and ``head`` columns and one more numeric column (named ``score``, or
    the only other one), as MAPS's ``scores.csv`` and :func:`write_scores_csv` have.
    """
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise HeadatlasError(f"cannot read the score CSV {str(path)!r}: {error}") from None
    if not {"layer", "head"} <= set(frame.columns):
        raise HeadatlasError(
            f"{str(path)!r} needs layer and head columns, has {', '.join(map(str, frame.columns))}"
        )
    others = [
        c for c in frame.columns if c not in ("layer", "head") and pd.api.types.is_numeric_dtype(frame[c])
    ]
    column = "score" if "score" in frame.columns else (others[0] if len(others) == 1 else None)
    if column is None:
        raise HeadatlasError(f"{str(path)!r}: name the score column 'score' (numeric columns: {others})")
    ids = frame[["layer", "head"]]
    if not all(pd.api.types.is_integer_dtype(ids[c]) for c in ids) or bool((ids < 0).any().any()):
        raise HeadatlasError(f"{str(path)!r}: layer and head must be non-negative integers")
    if not pd.api.types.is_numeric_dtype(frame[column]):
        raise HeadatlasError(f"{str(path)!r}: the {column!r} column holds values that are not numbers")
    twice = frame[ids.duplicated(keep=False)]
    if len(twice):
        first = twice.iloc[0]
        raise HeadatlasError(
            f"{str(path)!r} lists head L{int(first['layer'])}H{int(first['head'])} more than once: one row per head"
        )
    rows = n_layers or int(ids["layer"].max()) + 1
    cols = n_heads or int(ids["head"].max()) + 1
    out = np.full((rows, cols), np.nan)
    for layer, head, value in zip(frame["layer"], frame["head"], frame[column], strict=True):
        if layer >= rows or head >= cols:
            raise HeadatlasError(
                f"{str(path)!r}: head {layer}-{head} is outside {rows} layers × {cols} heads"
            )
        out[int(layer), int(head)] = value
    return out


@dataclass(frozen=True)
class Format:
    """A foreign format: what it holds, its writer and its reader."""

    name: str
    holds: str
    write: Callable[..., Path]
    read: Callable[..., Any]


FORMATS: dict[str, Format] = {
    "duo": Format("duo", "gates [layer, kv_head] + sink/recent (DuoAttention, kvpress)", write_duo, read_duo),
    "headkv": Format("headkv", "scores [layer, head] (Retrieval_Head, HeadKV)", write_headkv, read_headkv),
    "retrieval-head": Format(
        "retrieval-head", "scores [layer, head] (Retrieval_Head's head_score JSON)", write_headkv, read_headkv
    ),
    "attention-tracker": Format(
        "attention-tracker",
        "important heads [(layer, head)] (Attention Tracker)",
        write_attention_tracker,
        read_attention_tracker,
    ),
    "csv": Format(
        "csv", "scores [layer, head] (MAPS's scores.csv layout)", write_scores_csv, read_scores_csv
    ),
}


def check_format(name: str) -> Format:
    """Return the :class:`Format` called ``name``; a one-line error naming the known ones otherwise."""
    if name not in FORMATS:
        raise HeadatlasError(f"unknown {param('format')} {name!r}: use one of {', '.join(FORMATS)}")
    return FORMATS[name]
