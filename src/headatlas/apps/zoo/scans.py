"""A zoo: several models scanned with the same batteries, and a table comparing them.

Each model's atlas goes to ``ZOO_DIR/<member>/`` (a normal atlas directory: ``show``, ``report``
and ``serve`` read it); the comparison goes to ``ZOO_DIR/zoo.csv`` (one row per model and role),
``zoo.json`` (the same rows, the settings and which atlas each row came from) and ``zoo.png``.

A head's *relative depth* is ``(layer + 0.5) / n_layers``: the middle of its layer as a fraction
of the model's depth, so models with different numbers of layers compare (layer 0 of 30 is
0.017, the last 0.983). Olsson et al. 2022 and Wang et al. 2023 place induction and name-mover
heads by depth in this way.

Models are scanned one after another (each may shard its batches over Ray with ``ray``); a
member whose atlas is already in ``ZOO_DIR`` with the same settings is reused, a partial one is
resumed, so an interrupted zoo loses nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ...atlas.table import Atlas
from ...core.errors import HeadatlasError, param
from ...core.outputs import check_output_dir
from ...core.roles import RULES
from ...core.storage import directory_lock, write_json, write_text
from ...model.load import load
from ...report.figures import zoo_figure
from ...scanning.config import ScanConfig
from ...scanning.scan import scan
from ...scanning.stream import BatchDone

logger = logging.getLogger(__name__)

TABLE_NAME = "zoo.csv"
META_NAME = "zoo.json"
FIGURE_NAME = "zoo.png"
ANY_ROLE = "any"
"""The comparison row of heads that hold at least one role."""
COLUMNS = (
    "model",
    "n_layers",
    "n_heads",
    "role",
    "heads",
    "share",
    "depth_mean",
    "depth_q25",
    "depth_median",
    "depth_q75",
)
"""Columns of the comparison table: ``share`` is ``heads`` over the model's heads; the depth
columns are statistics of the role's heads' relative depth (NaN when it has none)."""


@dataclass
class Zoo:
    """A finished zoo: the comparison table, each member's atlas and where it lives."""

    table: pd.DataFrame
    atlases: dict[str, Atlas]
    dirs: dict[str, Path] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)


def member_name(spec: str) -> str:
    """Return the directory name of the zoo member loaded from ``spec`` (a packaged name or a path)."""
    base = Path(spec.rstrip("/")).name if ("/" in spec or spec.endswith(".gguf")) else spec
    base = re.sub(r"\.gguf$", "", base)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")
    if not name:
        raise HeadatlasError(f"cannot name a zoo member after {spec!r}: give a model name or path")
    return name


def head_depths(atlas: Atlas) -> pd.DataFrame:
    """Return one row per (head, role) of ``atlas``: ``role``, ``layer``, ``head``, ``depth``.

    ``depth`` is the relative depth ``(layer + 0.5) / n_layers``; a head with several roles has
    a row for each, a head with none has no row.
    """
    n_layers = atlas.model.n_layers
    rows = []
    for layer, head, held in zip(
        atlas.table["layer"], atlas.table["head"], atlas.table["roles"], strict=True
    ):
        for role in str(held or "").split(","):
            if role:
                rows.append((role, int(layer), int(head), (int(layer) + 0.5) / n_layers))
    return pd.DataFrame(rows, columns=["role", "layer", "head", "depth"])


def compare(atlases: Mapping[str, Atlas]) -> pd.DataFrame:
    """Return the comparison table (:data:`COLUMNS`): every model × every role any model holds.

    Roles come in :data:`~headatlas.core.roles.RULES` order; a model without a role has ``heads`` 0.
    The last row of each model, role :data:`ANY_ROLE`, counts the heads holding at least one role.
    """
    depths = {name: head_depths(atlas) for name, atlas in atlases.items()}
    held = {role for frame in depths.values() for role in frame["role"]}
    roles = [r.role for r in RULES if r.role in held]
    rows = []
    for name, atlas in atlases.items():
        model = atlas.model
        total = model.n_layers * model.n_heads
        frame = depths[name]
        for role in [*roles, ANY_ROLE]:
            if role == ANY_ROLE:
                at = frame.drop_duplicates(["layer", "head"])["depth"].to_numpy()  # [heads with a role]
            else:
                at = frame.loc[frame["role"] == role, "depth"].to_numpy()  # [heads with role]
            stats = np.quantile(at, [0.25, 0.5, 0.75]) if len(at) else [np.nan] * 3
            rows.append(
                (
                    name,
                    model.n_layers,
                    model.n_heads,
                    role,
                    len(at),
                    len(at) / total,
                    float(at.mean()) if len(at) else np.nan,
                    *map(float, stats),
                )
            )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def zoo(
    models: Sequence[str],
    out: str | Path,
    config: ScanConfig,
    force: bool = False,
    ray: str | None = None,
    workers: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    on_model: Callable[[str, int, int], None] | None = None,
    on_batch: Callable[[BatchDone], None] | None = None,
) -> Zoo:
    """Scan every model in ``models`` with ``config`` into ``out/<member>/`` and compare them.

    Returns a :class:`Zoo` and writes :data:`TABLE_NAME`, :data:`META_NAME` and
    :data:`FIGURE_NAME` into ``out``. ``force`` rescans members already there; otherwise a
    finished member with the same settings is reused and a partial one resumed. ``on_model``
    hears ``(model, index, total)`` before each member, ``on_batch`` each batch of its scan.
    """
    if len(models) < 2:
        raise HeadatlasError(f"a zoo compares models: give at least two {param('models')}")
    names = [member_name(m) for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise HeadatlasError(f"two models would share the zoo directory {twice[0]!r}: give distinct models")
    root = Path(out)
    check_output_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    result = Zoo(pd.DataFrame(columns=list(COLUMNS)), {})
    with directory_lock(root):
        for index, (spec, name) in enumerate(zip(models, names, strict=True)):
            if on_model is not None:
                on_model(spec, index, len(models))
            loaded = load(spec, device=device, dtype=dtype)
            member = root / name
            atlas = scan(
                loaded,
                config=config,
                out=member,
                resume=not force,
                force=force,
                on_batch=on_batch,
                ray=ray,
                workers=workers,
                device=device,
                dtype=dtype,
            )
            if getattr(atlas, "reused", False):
                result.reused.append(name)
            result.atlases[name], result.dirs[name] = atlas, member
            logger.info("zoo member %s → %s", spec, member)
        result.table = compare(result.atlases)
        write_zoo(result, root, config, dict(zip(names, models, strict=True)))
    return result


def write_zoo(result: Zoo, out: Path, config: ScanConfig, sources: Mapping[str, str]) -> None:
    """Write the comparison table, its metadata and its figure into ``out`` (each file atomically)."""
    write_text(out / TABLE_NAME, result.table.to_csv(index=False, float_format="%.4f"))
    meta = {
        "probes": list(config.probes),
        "n_prompts": config.n_prompts,
        "seq_len": config.seq_len,
        "seed": config.seed,
        "depth": "(layer + 0.5) / n_layers",
        "members": {
            name: {
                "model": sources[name],
                "atlas": name,
                "display_name": atlas.model.name,
                "wall_seconds": atlas.meta.get("wall_seconds"),
            }
            for name, atlas in result.atlases.items()
        },
        "rows": result.table.replace({np.nan: None}).to_dict(orient="records"),
    }
    write_json(out / META_NAME, meta)
    depths = {name: head_depths(atlas) for name, atlas in result.atlases.items()}
    zoo_figure(depths, result.table, out / FIGURE_NAME)
