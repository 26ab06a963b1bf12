"""Run several functional batteries, saving each finished one so an interrupted scan can resume.

A finished battery's statistics go to ``DIR/.partial/functional-<name>.npz`` (``np.savez``, loaded
with ``allow_pickle=False``), its parameters and the scan fingerprint to ``functional-<name>.json``
and its side tables to ``functional-<name>--<table>.parquet``, each written to a temporary file and
renamed. ``resume=True`` reuses a saved battery whose fingerprint matches; a battery interrupted
midway is run again from its start.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import HeadatlasError
from ..stats import HeadStats
from . import battery_spec
from .base import FunctionalConfig, FunctionalResult

if TYPE_CHECKING:
    import pandas as pd

    from ..loading import LoadedModel

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

BatteryProgress = Callable[[str, int, int], None]
"""Callback ``(battery, done, total)``."""


@dataclass
class FunctionalRun:
    """The merged statistics, per-battery parameters and side tables of several functional batteries."""

    stats: HeadStats
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def _paths(directory: Path, name: str) -> tuple[Path, Path]:
    partial = directory / PARTIAL_DIR
    return partial / f"functional-{name}.npz", partial / f"functional-{name}.json"


def _save(directory: Path, result: FunctionalResult, fingerprint: str) -> None:
    stats_file, meta_file = _paths(directory, result.battery)
    stats_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = stats_file.with_suffix(".tmp.npz")
    np.savez(tmp, **result.stats.state())  # type: ignore[arg-type]
    os.replace(tmp, stats_file)
    for table, frame in result.tables.items():
        target = stats_file.parent / f"functional-{result.battery}--{table}.parquet"
        frame.to_parquet(target.with_suffix(".tmp"), index=False)
        os.replace(target.with_suffix(".tmp"), target)
    meta = {"fingerprint": fingerprint, "params": result.params, "tables": sorted(result.tables)}
    meta_file.with_suffix(".tmp").write_text(json.dumps(meta, default=str))
    os.replace(meta_file.with_suffix(".tmp"), meta_file)


def _load(directory: Path, name: str, fingerprint: str) -> FunctionalResult | None:
    import pandas as pd

    stats_file, meta_file = _paths(directory, name)
    if not meta_file.exists():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") != fingerprint:
            raise HeadatlasError(
                f"the partial {name!r} battery in {directory} used other settings: rerun with the "
                "same settings, or with --force to start over"
            )
        with np.load(stats_file, allow_pickle=False) as data:
            stats = HeadStats.from_state({k: data[k] for k in data.files})
        tables = {}
        for table in meta.get("tables", []):
            if not _TABLE_NAME.match(str(table)):
                raise ValueError(f"bad table name {table!r}")
            tables[table] = pd.read_parquet(stats_file.parent / f"functional-{name}--{table}.parquet")
    except HeadatlasError:
        raise
    except Exception as exc:  # damaged files: numpy, json and pyarrow raise several types
        raise HeadatlasError(
            f"the partial {name!r} battery in {directory} is unreadable ({type(exc).__name__}): rerun with --force"
        ) from exc
    return FunctionalResult(name, stats, dict(meta.get("params", {})), tables)


def run_functional(
    loaded: LoadedModel,
    names: Sequence[str],
    config: FunctionalConfig,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    on_progress: BatteryProgress | None = None,
) -> FunctionalRun:
    """Run functional batteries ``names`` in order and return their merged :class:`FunctionalRun`.

    With ``checkpoint_dir`` each finished battery is saved under ``DIR/.partial``; with
    ``resume=True`` a saved battery with the same ``fingerprint`` is reused instead of rerun.
    """
    info = loaded.info
    out = FunctionalRun(HeadStats(info.n_layers, info.n_heads))
    for name in dict.fromkeys(names):
        spec = battery_spec(name)
        result = _load(checkpoint_dir, name, fingerprint) if checkpoint_dir is not None and resume else None
        if result is None:

            def progress(done: int, total: int, battery: str = name) -> None:
                if on_progress is not None:
                    on_progress(battery, done, total)

            result = spec.run(loaded, config, progress)
            if checkpoint_dir is not None:
                _save(checkpoint_dir, result, fingerprint)
        else:
            logger.info("resuming: the %s battery is already done", name)
        for table in result.tables:
            if not _TABLE_NAME.match(table):
                raise HeadatlasError(f"battery {name!r} produced a table with a bad name {table!r}")
        out.stats = out.stats.merge(result.stats)
        out.params[name] = {**result.params, "paper": spec.paper, "scores": list(spec.scores)}
        out.tables.update(result.tables)
    return out
