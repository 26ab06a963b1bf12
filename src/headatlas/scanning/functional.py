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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atlas.stats import HeadStats
from ..core.errors import HeadatlasError, param
from ..core.storage import FUNCTIONAL_PREFIX, PARTIAL_DIR, SIDE_TABLE_NAME, atomic_path, write_json
from ..functional import battery_spec
from ..functional.base import FunctionalConfig, FunctionalResult
from .stream import cost

if TYPE_CHECKING:
    import pandas as pd

    from ..model.info import LoadedModel
    from .parallel import WorkerPool

logger = logging.getLogger(__name__)

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
    return partial / f"{FUNCTIONAL_PREFIX}{name}.npz", partial / f"{FUNCTIONAL_PREFIX}{name}.json"


def _table_path(directory: Path, name: str, table: str) -> Path:
    return directory / PARTIAL_DIR / f"{FUNCTIONAL_PREFIX}{name}--{table}.parquet"


def _save(directory: Path, result: FunctionalResult, fingerprint: str) -> None:
    stats_file, meta_file = _paths(directory, result.battery)
    result.stats.save(stats_file)
    for table, frame in result.tables.items():
        with atomic_path(_table_path(directory, result.battery, table)) as tmp:
            frame.to_parquet(tmp, index=False)
    write_json(
        meta_file, {"fingerprint": fingerprint, "params": result.params, "tables": sorted(result.tables)}
    )


def _load(directory: Path, name: str, fingerprint: str) -> FunctionalResult | None:
    import pandas as pd

    stats_file, meta_file = _paths(directory, name)
    if not meta_file.exists():
        return None
    force = param("force", "force=True")
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") != fingerprint:
            raise HeadatlasError(
                f"the partial {name!r} battery in {directory} used other settings: rerun with the "
                f"same settings, or with {force} to start over"
            )
        stats = HeadStats.load(stats_file)
        tables = {}
        for table in meta.get("tables", []):
            if not SIDE_TABLE_NAME.match(str(table)):
                raise ValueError(f"bad table name {table!r}")
            tables[table] = pd.read_parquet(_table_path(directory, name, table))
    except HeadatlasError:
        raise
    except Exception as exc:  # damaged files: numpy, json and pyarrow raise several types
        raise HeadatlasError(
            f"the partial {name!r} battery in {directory} is unreadable ({type(exc).__name__}): rerun with {force}"
        ) from exc
    return FunctionalResult(name, stats, dict(meta.get("params", {})), tables)


def _run_one(loaded: LoadedModel, job: tuple[str, FunctionalConfig]) -> FunctionalResult:
    """A Ray shard: run one functional battery on a worker (no progress bar there)."""
    name, config = job
    return battery_spec(name).run(loaded, config, lambda _done, _total: None)


def run_functional(
    loaded: LoadedModel,
    names: Sequence[str],
    config: FunctionalConfig,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    on_progress: BatteryProgress | None = None,
    pool: WorkerPool | None = None,
) -> FunctionalRun:
    """Run functional batteries ``names`` and return their merged :class:`FunctionalRun`.

    With ``checkpoint_dir`` each finished battery is saved under ``DIR/.partial``; with
    ``resume=True`` a saved battery with the same ``fingerprint`` is reused instead of rerun.
    With ``pool`` the batteries run on its Ray workers, one battery per shard.
    """
    info = loaded.info
    if names:
        info.require_one_stack(f"the functional batteries ({', '.join(names)})")
    out = FunctionalRun(HeadStats(info.n_layers, info.n_heads))
    ordered = list(dict.fromkeys(names))
    results: dict[str, FunctionalResult] = {}
    for name in ordered:
        battery_spec(name)  # an unknown name fails before any work
        found = _load(checkpoint_dir, name, fingerprint) if checkpoint_dir is not None and resume else None
        if found is not None:
            logger.info("resuming: the %s battery is already done", name)
            results[name] = found
    todo = [name for name in ordered if name not in results]
    if pool is not None:
        finished = pool.map_unordered(_run_one, [(name, config) for name in todo])
    else:

        def one_by_one() -> Iterator[FunctionalResult]:
            for name in todo:

                def progress(done: int, total: int, battery: str = name) -> None:
                    if on_progress is not None:
                        on_progress(battery, done, total)

                started = time.perf_counter()
                result = battery_spec(name).run(loaded, config, progress)
                result.params.update(cost(time.perf_counter() - started))
                yield result

        finished = one_by_one()
    for result in finished:
        if checkpoint_dir is not None:
            _save(checkpoint_dir, result, fingerprint)
        if pool is not None and on_progress is not None:
            on_progress(result.battery, 1, 1)
        results[result.battery] = result
    for name in ordered:
        spec = battery_spec(name)
        result = results[name]
        empty = [
            score
            for score in spec.scores
            if score not in result.stats.names or not result.stats.n(score).any()
        ]
        if empty:
            logger.warning(
                "the %s battery produced no valid rows for %s: every value is NaN; give it more prompts "
                "(n_functional / --n-functional)",
                name,
                ", ".join(empty),
            )
        for table in result.tables:
            if not SIDE_TABLE_NAME.match(table):
                raise HeadatlasError(f"battery {name!r} produced a table with a bad name {table!r}")
        out.stats = out.stats.merge(result.stats)
        out.params[name] = {**result.params, "paper": spec.paper, "scores": list(spec.scores)}
        out.tables.update(result.tables)
    return out
