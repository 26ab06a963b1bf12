"""The atlas: one row per (layer, head) with every score, its spread and count, and roles.

This module is the table and nothing else: it builds, saves, loads, merges and checks atlases and
imports no pipeline stage (no torch), so ``headatlas show``, ``report`` and ``serve`` of a saved
atlas stay light. :func:`headatlas.scan` (in :mod:`headatlas.scanning.scan`) makes one from a model.

Saved as ``DIR/atlas.parquet`` (the table) + ``DIR/atlas.json`` (metadata), side tables and
example maps beside them, each written atomically (:mod:`headatlas.core.storage`), so a crash never
leaves half an atlas over a good one.
"""

from __future__ import annotations

import html
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..core.errors import RESCAN, HeadatlasError, check_at_least, param
from ..core.heads import head_name
from ..core.outputs import check_output_dir
from ..core.roles import RULES, assign_roles
from ..core.scores import VECTOR_SCORES, ordered
from ..core.storage import (
    EXAMPLES_FILE,
    META_FILE,
    OWNED_FILE,
    SIDE_TABLE_NAME,
    TABLE_FILE,
    atomic_path,
    has_partial,
    owned_files,
    write_json,
)
from ..model.info import ModelInfo
from .schema import SCHEMA_VERSION, migrate

if TYPE_CHECKING:
    from .stats import HeadStats

logger = logging.getLogger(__name__)

_FORCE = param(RESCAN, "scan(..., force=True)")
"""What to do about a damaged atlas: make it again (shown as the full command on the command line)."""
REQUIRED_COLUMNS = ("layer", "head", "kv_head", "roles")
"""Columns every atlas table has."""
NOT_SCORES = frozenset({"layer", "head", "kv_head", "cluster", "stack_layer"})
"""Numeric columns that identify or group heads; they never rank them."""


def versions() -> dict[str, str]:
    """Return the versions of Python and the packages that shape a result, for ``atlas.json``."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("headatlas", "torch", "transformers", "numpy", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class Example:
    """One short sequence and the attention of every head on it, kept with an atlas for pictures.

    ``tokens`` are the decoded token strings; ``attention`` is ``[layer, head, query, key]`` fp16.
    """

    label: str
    tokens: list[str]
    attention: np.ndarray


def _numeric(column: pd.Series) -> bool:
    return bool(pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column))


def _table_stamp(table: pd.DataFrame) -> dict[str, Any]:
    """What ``atlas.json`` records of the table it was saved with: rows and columns."""
    return {"rows": len(table), "columns": [str(c) for c in table.columns]}


def _validate(table: pd.DataFrame, meta: Any, where: Path) -> None:
    """Raise :class:`HeadatlasError` unless ``table`` and ``meta`` form an atlas (one line, what to do)."""
    fix = f"rescan it: {_FORCE}"
    if not isinstance(meta, dict):
        raise HeadatlasError(f"{where.with_name(META_FILE)} is not a JSON object: {fix}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise HeadatlasError(f"{where} has no {', '.join(missing)} column: not a headatlas table, {fix}")
    if table.empty:
        raise HeadatlasError(f"{where} has no rows: {fix}")
    ids = table[["layer", "head"]]
    if not all(pd.api.types.is_integer_dtype(ids[c]) for c in ids) or bool((ids < 0).any().any()):
        raise HeadatlasError(f"{where}: layer and head must be non-negative integers, {fix}")
    if ids.duplicated().any():
        raise HeadatlasError(f"{where} lists a head twice: {fix}")
    model = meta.get("model", {})
    if not isinstance(model, dict):
        raise HeadatlasError(f"{where.with_name(META_FILE)}: 'model' is not an object, {fix}")
    n_layers, n_heads = model.get("n_layers"), model.get("n_heads")
    beyond = isinstance(n_layers, int) and isinstance(n_heads, int)
    if beyond and (int(ids["layer"].max()) >= n_layers or int(ids["head"].max()) >= n_heads):  # type: ignore[operator]
        raise HeadatlasError(f"{where} has heads beyond the model's {n_layers} × {n_heads}: {fix}")
    stamp = meta.get("table")
    if isinstance(stamp, dict) and stamp != _table_stamp(table):
        raise HeadatlasError(
            f"{where} and {META_FILE} come from different saves (an interrupted write?): {fix}"
        )


def _head_grid(info: ModelInfo) -> dict[str, Any]:
    """The identifier columns: ``layer, head, kv_head``, and for an encoder–decoder model
    ``attn_kind`` (``encoder``/``decoder``/``cross``) and ``stack_layer`` (the layer in its stack)."""
    layers, heads = np.meshgrid(np.arange(info.n_layers), np.arange(info.n_heads), indexing="ij")
    grid: dict[str, Any] = {
        "layer": layers.ravel(),
        "head": heads.ravel(),
        "kv_head": heads.ravel() // info.group_size,
    }
    if info.attn_kinds is not None:
        grid["attn_kind"] = [info.kind(int(layer)) for layer in grid["layer"]]
        grid["stack_layer"] = np.asarray([info.stack_layer(int(layer)) for layer in grid["layer"]])
    return grid


class Atlas:
    """A scanned model's head table (:attr:`table`, a DataFrame) and metadata (:attr:`meta`)."""

    def __init__(
        self,
        table: pd.DataFrame,
        meta: dict[str, Any],
        examples: list[Example] | None = None,
        tables: dict[str, pd.DataFrame] | None = None,
    ) -> None:
        self.table = table
        self.meta = meta
        self.examples: list[Example] = examples or []
        self.tables: dict[str, pd.DataFrame] = tables or {}
        """Side tables saved as ``DIR/<name>.parquet`` (e.g. ``syntax_relations``)."""
        self.reused = False
        """True when a resumed scan found this atlas already complete and computed nothing."""

    @classmethod
    def from_stats(cls, stats: HeadStats, info: ModelInfo, meta: dict[str, Any] | None = None) -> Atlas:
        """Build the table from per-head statistics: ``layer, head, kv_head``, then per score
        ``<score>``, ``<score>_std``, ``<score>_n``, vector scores as list columns, and ``roles``."""
        table: dict[str, Any] = _head_grid(info)
        names = [n for n in ordered(stats.names) if n not in VECTOR_SCORES]
        for name in names:
            table[name] = stats.mean(name).ravel()
            table[f"{name}_std"] = stats.std(name).ravel()
            table[f"{name}_n"] = stats.n(name).ravel()
        for name in sorted(VECTOR_SCORES & set(stats.names)):
            profile = stats.mean(name).reshape(info.n_layers * info.n_heads, -1)
            table[name] = [np.round(row, 6).tolist() for row in profile]
        table["roles"] = assign_roles({n: np.asarray(table[n]) for n in names})
        full = {
            "model": info.to_dict(),
            **(meta or {}),
            "versions": versions(),
            "roles": [{"role": r.role, "score": r.score, "threshold": r.threshold} for r in RULES],
        }
        return cls(pd.DataFrame(table), full)

    @classmethod
    def minimal(cls, info: ModelInfo) -> Atlas:
        """An atlas with one row per head and no scores yet (apps write their columns into it)."""
        table = pd.DataFrame(_head_grid(info))
        table["roles"] = [""] * len(table)
        return cls(table, {"model": info.to_dict(), "versions": versions()})

    @property
    def model(self) -> ModelInfo:
        """The facts of the model this atlas was made from (``atlas.json``'s ``model``), typed; an
        older atlas's missing fields read as :meth:`ModelInfo.from_facts` says (``n_layers`` /
        ``n_heads`` from the table, ``n_kv_heads`` = ``n_heads``)."""
        facts = self.meta.get("model")
        return ModelInfo.from_facts(
            facts if isinstance(facts, dict) else {},
            n_layers=int(self.table["layer"].max()) + 1,
            n_heads=int(self.table["head"].max()) + 1,
        )

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_layers, n_heads)`` of the model (from the metadata, else from the table)."""
        model = self.model
        return model.n_layers, model.n_heads

    def matrix(self, name: str) -> np.ndarray:
        """Return score column ``name`` as a ``[layer, head]`` float array (NaN where a head is missing).

        Raises :class:`HeadatlasError` unless ``name`` is one of :attr:`score_columns`: ``roles``,
        ``distance_profile``, ``layer`` or ``cluster`` cannot rank heads.
        """
        self.check_score(name)
        column = self.table[name]
        out = np.full(self.shape, np.nan)
        out[self.table["layer"].to_numpy(dtype=int), self.table["head"].to_numpy(dtype=int)] = (
            column.to_numpy(dtype=float)
        )
        return out

    def check_score(self, name: str) -> None:
        """Raise :class:`HeadatlasError` unless ``name`` is a column that can rank heads (:attr:`score_columns`)."""
        if name not in self.score_columns:
            what = (
                f"no score {name!r} in" if name not in self.table.columns else f"{name!r} is not a score of"
            )
            choices = ", ".join(self.score_columns) or "none yet"
            raise HeadatlasError(f"{what} this atlas (scores rank heads; choose from {choices})")

    def reassign_roles(self) -> None:
        """Recompute the ``roles`` column from every score, by :data:`headatlas.core.roles.RULES`."""
        self.table["roles"] = assign_roles({s: self.table[s].to_numpy(dtype=float) for s in self.scores})

    def set_matrix(self, name: str, values: np.ndarray) -> None:
        """Set column ``name`` from a ``[layer, head]`` array, aligned on the table's layer/head columns."""
        layers = self.table["layer"].to_numpy(dtype=int)
        heads = self.table["head"].to_numpy(dtype=int)
        self.table[name] = np.asarray(values)[layers, heads]

    @property
    def scores(self) -> list[str]:
        """Names of the scalar scores in the table (columns with ``_n`` counts)."""
        return [c[:-2] for c in self.table.columns if c.endswith("_n") and c[:-2] in self.table.columns]

    @property
    def score_columns(self) -> list[str]:
        """Numeric columns that can rank heads: the scores and score-like columns such as
        ``importance_gradient_raw``; never ids (``layer``, ``head``, ``kv_head``), ``cluster``,
        ``_std``/``_n`` companions, ``roles`` or vector columns."""
        return [
            c
            for c in self.table.columns
            if c not in NOT_SCORES and not str(c).endswith(("_std", "_n")) and _numeric(self.table[c])
        ]

    def top(self, score: str, k: int = 10, ascending: bool = False) -> pd.DataFrame:
        """Return the ``k`` heads with the highest (or lowest) ``score``."""
        check_at_least("k", k, 0)
        self.check_score(score)
        return self.table.sort_values(score, ascending=ascending, na_position="last").head(k)

    def with_role(self, role: str) -> pd.DataFrame:
        """Return the heads holding ``role``."""
        known = {r.role for r in RULES}
        if role not in known:
            raise HeadatlasError(f"unknown role {role!r}: choose from {', '.join(sorted(known))}")
        has = self.table["roles"].fillna("").str.split(",").apply(lambda r: role in r)
        return self.table[has]

    def save(self, directory: str | Path) -> Path:
        """Write the atlas into ``directory``, each file atomically; return the directory.

        Side tables and examples go first and the table last, so the files a reader trusts
        (``atlas.parquet`` + ``atlas.json``) are replaced only once everything else is on disk.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in self.tables:
            if not SIDE_TABLE_NAME.match(name):
                raise HeadatlasError(f"side table name {name!r} is not a plain identifier")
        if self.tables:
            self.meta["tables"] = sorted(self.tables)
        if self.examples:
            arrays: dict[str, np.ndarray] = {"n": np.array([len(self.examples)])}
            for i, ex in enumerate(self.examples):
                arrays[f"label_{i}"] = np.array(ex.label)
                arrays[f"tokens_{i}"] = np.array(ex.tokens, dtype=str)
                arrays[f"attention_{i}"] = ex.attention
            with atomic_path(out / EXAMPLES_FILE) as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
        for name, frame in self.tables.items():
            with atomic_path(out / f"{name}.parquet") as tmp:
                frame.to_parquet(tmp, index=False)
        with atomic_path(out / TABLE_FILE) as tmp:
            self.table.to_parquet(tmp, index=False)
        self.meta["table"] = _table_stamp(self.table)
        self.meta["schema_version"] = SCHEMA_VERSION
        write_json(out / META_FILE, self.meta, indent=2)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Atlas:
        """Read an atlas saved by :meth:`save`; raise :class:`HeadatlasError` if missing or corrupt."""
        if not isinstance(directory, str | os.PathLike):
            raise HeadatlasError(
                f"{param('directory')} must be a path to an atlas directory, got {directory!r}"
            )
        src = Path(directory)
        table_file, meta_file = src / TABLE_FILE, src / META_FILE
        if not table_file.exists():
            if has_partial(src):
                raise HeadatlasError(
                    f"{str(src)!r} holds an unfinished scan: finish it with {param('resume', 'scan(..., resume=True)')}"
                )
            raise HeadatlasError(f"no atlas in {str(src)!r}: scan one into it first")
        try:
            table = pd.read_parquet(table_file)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise HeadatlasError(
                f"{table_file} is not a readable atlas table ({type(exc).__name__}): rescan it: {_FORCE}"
            ) from exc
        if not meta_file.exists():
            raise HeadatlasError(
                f"{meta_file} is missing: the atlas in {str(src)!r} is incomplete, rescan it: {_FORCE}"
            )
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HeadatlasError(f"{meta_file} is not valid JSON: rescan it: {_FORCE}") from exc
        if isinstance(meta, dict):
            meta = migrate(meta, meta_file)
        _validate(table, meta, table_file)
        tables: dict[str, pd.DataFrame] = {}
        for name in meta.get("tables", []):
            path = src / f"{name}.parquet"
            if not SIDE_TABLE_NAME.match(str(name)) or not path.exists():
                continue
            try:
                tables[name] = pd.read_parquet(path)
            except Exception as exc:  # pyarrow raises several types for damaged files
                raise HeadatlasError(
                    f"{path} is not a readable side table ({type(exc).__name__}): rescan"
                ) from exc
        examples = _load_examples(src / EXAMPLES_FILE)
        shape = (int(meta["model"]["n_layers"]), int(meta["model"]["n_heads"])) if "model" in meta else None
        for ex in examples:
            if shape is not None and tuple(np.shape(ex.attention)[:2]) != shape:
                raise HeadatlasError(
                    f"{src / EXAMPLES_FILE} holds maps of another model ({np.shape(ex.attention)[0]} layers × "
                    f"{np.shape(ex.attention)[1]} heads): rescan it: {_FORCE}"
                )
        return cls(table, meta, examples, tables)

    def __repr__(self) -> str:
        return f"Atlas({self.model.name}: {len(self.table)} heads, scores={self.scores})"

    def _repr_html_(self) -> str:
        """Jupyter summary: the model, and per role its rule, how many heads hold it and the top heads.

        Every value is HTML-escaped. The full report is ``headatlas report DIR``.
        """
        esc = html.escape
        model = self.model
        facts = f"{model.n_layers} layers × {model.n_heads} heads"
        rows = []
        for rule in RULES:
            if rule.score not in self.table.columns:
                continue
            holders = len(self.with_role(rule.role))
            top = self.top(rule.score, 3, ascending=rule.below)
            best = ", ".join(
                f"{head_name(layer, head)} ({float(value):.2f})"
                for layer, head, value in zip(top["layer"], top["head"], top[rule.score], strict=True)
            )
            rows.append(
                f"<tr><td>{esc(rule.role)}</td><td>{esc(rule.score)} {'≤' if rule.below else '≥'} {rule.threshold:g}</td>"
                f"<td style='text-align:right'>{holders}</td><td>{esc(best)}</td></tr>"
            )
        head = "<tr><th>role</th><th>rule</th><th>heads</th><th>top heads by the score</th></tr>"
        return (
            f"<div><p><b>{esc(model.name)}</b> — {esc(facts)}</p><table>{head}{''.join(rows)}</table></div>"
        )


def _load_examples(path: Path) -> list[Example]:
    """Read ``examples.npz`` (no pickle); a missing file means no examples."""
    if not path.exists():
        return []
    try:
        with np.load(path, allow_pickle=False) as data:
            n = int(data["n"][0])
            return [
                Example(
                    str(data[f"label_{i}"]), [str(t) for t in data[f"tokens_{i}"]], data[f"attention_{i}"]
                )
                for i in range(n)
            ]
    except (OSError, ValueError, KeyError) as exc:
        raise HeadatlasError(
            f"{path} is not a readable examples file ({type(exc).__name__}): rescan it: {_FORCE}"
        ) from exc


def check_out_dir(out: Path, force: bool, resume: bool) -> None:
    """Refuse to scan into a directory that already holds results, unless ``force`` or ``resume``."""
    check_output_dir(out)
    holds = out.exists() and ((out / TABLE_FILE).exists() or has_partial(out))
    if holds and not (force or resume):
        raise HeadatlasError(
            f"{str(out)!r} already holds an atlas or a partial scan: pass {param('resume', 'resume=True')} "
            f"to continue it or {param('force', 'force=True')} to overwrite"
        )


def check_same_model(atlas: Atlas, info: ModelInfo, where: str) -> None:
    """Refuse an atlas made from another model than ``info`` describes (by weights sha256, then by shape)."""
    model = atlas.meta.get("model")
    if not isinstance(model, dict) or "n_layers" not in model:
        raise HeadatlasError(f"the atlas in {where!r} does not say which model it was made from: rescan it")
    theirs, ours = model.get("sha256"), info.sha256
    if theirs != ours and (theirs or ours):
        raise HeadatlasError(
            f"the atlas in {where!r} was made from another model (sha256 {str(theirs)[:12]}… ≠ "
            f"{str(ours)[:12]}…): use a fresh atlas directory or the atlas's model"
        )
    shape = (model.get("n_layers"), model.get("n_heads"))
    if shape != (info.n_layers, info.n_heads):
        raise HeadatlasError(
            f"the atlas in {where!r} has {shape[0]} layers × {shape[1]} heads, the model "
            f"{info.n_layers} × {info.n_heads}: use the atlas's model"
        )


def merge_atlases(base: Atlas, new: Atlas) -> Atlas:
    """Return ``base`` with every score column of ``new`` added or replaced (aligned on layer/head).

    Side tables and examples of ``new`` are added, ``atlas.json`` records both scans' batteries and
    probes (``added`` lists each later scan's probes, seed, tokens and time; ``tokens`` and
    ``wall_seconds`` are the totals; ``seed`` is ``null`` when the scans used different seeds, all
    of which are in ``seeds``), and roles are reassigned from all scores. Both must describe the
    same model.
    """
    if base.shape != new.shape:
        raise HeadatlasError("cannot merge atlases of models with different layer/head counts")
    keys = ["layer", "head"]
    columns = [c for c in new.table.columns if c not in ("layer", "head", "kv_head", "roles")]
    table = base.table.drop(columns=[c for c in columns if c in base.table.columns])
    table = table.merge(new.table[keys + columns], on=keys, how="left", validate="one_to_one")
    Atlas(table, {}, [], {}).reassign_roles()
    meta = dict(base.meta)
    meta["batteries"] = {**base.meta.get("batteries", {}), **new.meta.get("batteries", {})}
    meta["probes"] = list(dict.fromkeys([*base.meta.get("probes", []), *new.meta.get("probes", [])]))
    meta["added"] = [
        *base.meta.get("added", []),
        {k: new.meta.get(k) for k in ("probes", "wall_seconds", "fingerprint", "seed", "tokens")},
    ]
    meta["tokens"] = int(base.meta.get("tokens") or 0) + int(new.meta.get("tokens") or 0)
    meta["wall_seconds"] = round(
        float(base.meta.get("wall_seconds") or 0) + float(new.meta.get("wall_seconds") or 0), 3
    )
    if base.meta.get("seed") != new.meta.get("seed"):
        meta["seed"] = None  # scans with different seeds: each one's is in "added" and the first's in "seeds"
        meta["seeds"] = list(
            dict.fromkeys([*base.meta.get("seeds", [base.meta.get("seed")]), new.meta.get("seed")])
        )
    meta["roles"] = new.meta.get("roles", meta.get("roles"))
    return Atlas(table, meta, new.examples or base.examples, {**base.tables, **new.tables})


def discard_atlas(directory: str | Path) -> None:
    """Remove every file an atlas in ``directory`` owns: table, metadata, examples, its side tables,
    and every other file headatlas wrote there (:func:`~headatlas.core.storage.owned_files`: the
    report, figures, verify and redundancy files, ...), then the folders those leave empty. A file
    headatlas did not write stays.

    Called when a new atlas replaces an old one (``force=True``), so nothing of the old model's
    (examples, figures, tables) survives next to the new one.
    """
    src = Path(directory).absolute()
    names: list[str] = []
    try:
        old = json.loads((src / META_FILE).read_text(encoding="utf-8"))
        names = [str(t) for t in old.get("tables", [])] if isinstance(old, dict) else []
    except (OSError, ValueError):
        pass
    owned = [src / TABLE_FILE, src / META_FILE, src / EXAMPLES_FILE]
    owned += [src / f"{n}.parquet" for n in names if SIDE_TABLE_NAME.match(n)]
    owned += [(src / n) for n in owned_files(src) if (src / n).resolve().is_relative_to(src.resolve())]
    for path in owned:
        if path.is_file() and not path.is_symlink():
            path.unlink()
            for folder in path.parents:  # folders the owned files leave empty (figures/scores, figures)
                if folder == src or any(folder.iterdir()):
                    break
                folder.rmdir()
    (src / OWNED_FILE).unlink(missing_ok=True)


def open_atlas(info: ModelInfo, directory: str | Path | None) -> Atlas:
    """Return the atlas in ``directory`` (checked to be of the model ``info`` describes), or a new
    :meth:`Atlas.minimal` one when there is none yet — where apps write their columns."""
    if directory is None or not (Path(directory) / TABLE_FILE).exists():
        return Atlas.minimal(info)
    atlas = Atlas.load(directory)
    check_same_model(atlas, info, str(directory))
    return atlas
