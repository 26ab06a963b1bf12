"""The atlas: one row per (layer, head) with every score, its spread and count, and roles.

Saved as ``DIR/atlas.parquet`` (the table) + ``DIR/atlas.json`` (metadata), each written to a
temporary file and renamed, so a crash never leaves half an atlas over a good one.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .detectors import VECTOR_SCORES
from .errors import HeadatlasError
from .functional import FUNCTIONAL_BATTERIES, FunctionalConfig
from .functional.runner import run_functional
from .loading import LoadedModel, load
from .roles import RULES, assign_roles
from .scanning import (
    BatchDone,
    Example,
    ScanResult,
    build_batteries,
    collect_examples,
    discard_partial,
    fingerprint,
    has_partial,
    run_scan,
)
from .stats import HeadStats

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

TABLE_FILE = "atlas.parquet"
META_FILE = "atlas.json"
EXAMPLES_FILE = "examples.npz"
_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
SCORE_ORDER = (
    "previous_token",
    "self",
    "first_token",
    "local",
    "entropy",
    "entropy_norm",
    "subword",
    "induction",
    "duplicate_token",
)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("headatlas", "torch", "transformers", "numpy", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


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

    @classmethod
    def from_scan(cls, result: ScanResult, extra_meta: dict[str, Any] | None = None) -> Atlas:
        """Build the table from a :class:`ScanResult`: ``layer, head, kv_head``, then per score
        ``<score>``, ``<score>_std``, ``<score>_n``, the ``distance_profile`` list column and ``roles``."""
        info = result.loaded.info
        stats = result.stats
        layers, heads = np.meshgrid(np.arange(info.n_layers), np.arange(info.n_heads), indexing="ij")
        table: dict[str, Any] = {
            "layer": layers.ravel(),
            "head": heads.ravel(),
            "kv_head": heads.ravel() // info.group_size,
        }
        names = [n for n in SCORE_ORDER if n in stats.names] + [
            n for n in stats.names if n not in SCORE_ORDER and n not in VECTOR_SCORES
        ]
        for name in names:
            table[name] = stats.mean(name).ravel()
            table[f"{name}_std"] = stats.std(name).ravel()
            table[f"{name}_n"] = stats.n(name).ravel()
        for name in sorted(VECTOR_SCORES & set(stats.names)):
            profile = stats.mean(name).reshape(info.n_layers * info.n_heads, -1)
            table[name] = [np.round(row, 6).tolist() for row in profile]
        table["roles"] = assign_roles({n: np.asarray(table[n]) for n in names})
        meta = {
            "model": info.to_dict(),
            **result.meta,
            "versions": _versions(),
            "roles": [{"role": r.role, "score": r.score, "threshold": r.threshold} for r in RULES],
            **(extra_meta or {}),
        }
        return cls(pd.DataFrame(table), meta)

    @property
    def scores(self) -> list[str]:
        """Names of the scalar scores in the table."""
        return [c[:-2] for c in self.table.columns if c.endswith("_n") and c[:-2] in self.table.columns]

    def top(self, score: str, k: int = 10, ascending: bool = False) -> pd.DataFrame:
        """Return the ``k`` heads with the highest (or lowest) ``score``."""
        if score not in self.table.columns or score in VECTOR_SCORES:
            raise HeadatlasError(f"no score {score!r} in this atlas: choose from {', '.join(self.scores)}")
        return self.table.sort_values(score, ascending=ascending, na_position="last").head(k)

    def with_role(self, role: str) -> pd.DataFrame:
        """Return the heads holding ``role``."""
        known = {r.role for r in RULES}
        if role not in known:
            raise HeadatlasError(f"unknown role {role!r}: choose from {', '.join(sorted(known))}")
        has = self.table["roles"].fillna("").str.split(",").apply(lambda r: role in r)
        return self.table[has]

    def save(self, directory: str | Path) -> Path:
        """Write ``atlas.parquet`` and ``atlas.json`` into ``directory`` atomically; return the directory."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (TABLE_FILE + ".tmp")
        self.table.to_parquet(tmp, index=False)
        tmp_meta = out / (META_FILE + ".tmp")
        if self.tables:
            self.meta["tables"] = sorted(self.tables)
        tmp_meta.write_text(json.dumps(self.meta, indent=2, default=str))
        if self.examples:
            arrays: dict[str, np.ndarray] = {"n": np.array([len(self.examples)])}
            for i, ex in enumerate(self.examples):
                arrays[f"label_{i}"] = np.array(ex.label)
                arrays[f"tokens_{i}"] = np.array(ex.tokens, dtype=str)
                arrays[f"attention_{i}"] = ex.attention
            with open(out / (EXAMPLES_FILE + ".tmp"), "wb") as fh:
                np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
            os.replace(out / (EXAMPLES_FILE + ".tmp"), out / EXAMPLES_FILE)
        for name, frame in self.tables.items():
            if not _TABLE_NAME.match(name):
                raise HeadatlasError(f"side table name {name!r} is not a plain identifier")
            frame.to_parquet(out / f"{name}.parquet.tmp", index=False)
            os.replace(out / f"{name}.parquet.tmp", out / f"{name}.parquet")
        os.replace(tmp, out / TABLE_FILE)
        os.replace(tmp_meta, out / META_FILE)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Atlas:
        """Read an atlas saved by :meth:`save`; raise :class:`HeadatlasError` if missing or corrupt."""
        src = Path(directory)
        table_file, meta_file = src / TABLE_FILE, src / META_FILE
        if not table_file.exists():
            raise HeadatlasError(f"no atlas in {str(src)!r}: run `headatlas scan --out {src}` first")
        try:
            table = pd.read_parquet(table_file)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise HeadatlasError(
                f"{table_file} is not a readable atlas table ({type(exc).__name__}): rescan with --force"
            ) from exc
        if not {"layer", "head"} <= set(table.columns):
            raise HeadatlasError(f"{table_file} has no layer/head columns: not a headatlas table")
        try:
            meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise HeadatlasError(f"{meta_file} is not valid JSON: rescan with --force") from exc
        tables: dict[str, pd.DataFrame] = {}
        for name in meta.get("tables", []):
            path = src / f"{name}.parquet"
            if not _TABLE_NAME.match(str(name)) or not path.exists():
                continue
            try:
                tables[name] = pd.read_parquet(path)
            except Exception as exc:  # pyarrow raises several types for damaged files
                raise HeadatlasError(
                    f"{path} is not a readable side table ({type(exc).__name__}): rescan"
                ) from exc
        return cls(table, meta, _load_examples(src / EXAMPLES_FILE), tables)

    def __repr__(self) -> str:
        model = self.meta.get("model", {}).get("name", "?")
        return f"Atlas({model}: {len(self.table)} heads, scores={self.scores})"

    def _repr_html_(self) -> str:
        """Jupyter summary: the model, and per role its rule, how many heads hold it and the top heads.

        Every value is HTML-escaped. The full report is ``headatlas report DIR``.
        """
        esc = html.escape
        model = self.meta.get("model", {})
        facts = f"{len(self.table)} heads"
        if model.get("n_layers") and model.get("n_heads"):
            facts = f"{model['n_layers']} layers × {model['n_heads']} heads"
        rows = []
        for rule in RULES:
            if rule.score not in self.table.columns:
                continue
            holders = len(self.with_role(rule.role))
            top = self.top(rule.score, 3, ascending=rule.below)
            best = ", ".join(
                f"L{int(layer)}H{int(head)} ({float(value):.2f})"
                for layer, head, value in zip(top["layer"], top["head"], top[rule.score], strict=True)
            )
            rows.append(
                f"<tr><td>{esc(rule.role)}</td><td>{esc(rule.score)} {'≤' if rule.below else '≥'} {rule.threshold:g}</td>"
                f"<td style='text-align:right'>{holders}</td><td>{esc(best)}</td></tr>"
            )
        head = "<tr><th>role</th><th>rule</th><th>heads</th><th>top heads by the score</th></tr>"
        return (
            f"<div><p><b>{esc(str(model.get('name', 'atlas')))}</b> — {esc(facts)}</p>"
            f"<table>{head}{''.join(rows)}</table></div>"
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
            f"{path} is not a readable examples file ({type(exc).__name__}): rescan with --force"
        ) from exc


def check_out_dir(out: Path, force: bool, resume: bool) -> None:
    """Refuse to scan into a directory that already holds results, unless ``force`` or ``resume``."""
    if out.exists() and not out.is_dir():
        raise HeadatlasError(f"--out {str(out)!r} is a file: give a directory")
    holds = out.exists() and ((out / TABLE_FILE).exists() or has_partial(out))
    if holds and not (force or resume):
        raise HeadatlasError(
            f"{str(out)!r} already holds an atlas or a partial scan: pass --resume to continue it or --force to overwrite"
        )


def check_same_model(atlas: Atlas, loaded: LoadedModel, where: str) -> None:
    """Refuse an atlas made from another model (by weights sha256, then by shape)."""
    model = atlas.meta.get("model", {})
    theirs, ours = model.get("sha256"), loaded.info.sha256
    if theirs != ours and (theirs or ours):
        raise HeadatlasError(
            f"the atlas in {where!r} was made from another model (sha256 {str(theirs)[:12]}… ≠ "
            f"{str(ours)[:12]}…): use a fresh --out/--atlas or the atlas's model"
        )
    shape = (model.get("n_layers"), model.get("n_heads"))
    if shape != (loaded.info.n_layers, loaded.info.n_heads):
        raise HeadatlasError(
            f"the atlas in {where!r} has {shape[0]} layers × {shape[1]} heads, the model "
            f"{loaded.info.n_layers} × {loaded.info.n_heads}: use the atlas's model"
        )


def merge_atlases(base: Atlas, new: Atlas) -> Atlas:
    """Return ``base`` with every score column of ``new`` added or replaced (aligned on layer/head).

    Side tables and examples of ``new`` are added, ``atlas.json`` records both scans' batteries and
    probes, and roles are reassigned from all scores. Both must describe the same model.
    """
    if (base.meta.get("model", {}).get("n_layers"), base.meta.get("model", {}).get("n_heads")) != (
        new.meta.get("model", {}).get("n_layers"),
        new.meta.get("model", {}).get("n_heads"),
    ):
        raise HeadatlasError("cannot merge atlases of models with different layer/head counts")
    keys = ["layer", "head"]
    columns = [c for c in new.table.columns if c not in ("layer", "head", "kv_head", "roles")]
    table = base.table.drop(columns=[c for c in columns if c in base.table.columns])
    table = table.merge(new.table[keys + columns], on=keys, how="left", validate="one_to_one")
    scores = [c[:-2] for c in table.columns if c.endswith("_n") and c[:-2] in table.columns]
    table["roles"] = assign_roles({s: table[s].to_numpy(dtype=float) for s in scores})
    meta = dict(base.meta)
    meta["batteries"] = {**base.meta.get("batteries", {}), **new.meta.get("batteries", {})}
    meta["probes"] = list(dict.fromkeys([*base.meta.get("probes", []), *new.meta.get("probes", [])]))
    meta["added"] = [
        *base.meta.get("added", []),
        {k: new.meta.get(k) for k in ("probes", "wall_seconds", "fingerprint")},
    ]
    meta["roles"] = new.meta.get("roles", meta.get("roles"))
    merged = Atlas(table, meta, new.examples or base.examples, {**base.tables, **new.tables})
    return merged


def _scan_fingerprint(
    loaded: LoadedModel,
    batteries: list[Any],
    batch_size: int,
    functional: list[str],
    config: FunctionalConfig,
) -> str:
    """Fingerprint of a whole scan: the attention batteries' and the functional settings."""
    base = fingerprint(loaded, batteries, batch_size)
    if not functional:
        return base
    extra = json.dumps([functional, config.n_prompts, config.max_len, config.seed, config.batch_size])
    return hashlib.sha256((base + extra).encode()).hexdigest()


def scan(
    model: str | LoadedModel | PreTrainedModel = "default",
    probes: Sequence[str] = ("natural", "repeat"),
    texts: Sequence[str] | None = None,
    text_file: str | Path | None = None,
    n_prompts: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    on_batch: Callable[[BatchDone], None] | None = None,
    n_functional: int | None = None,
    max_len: int | None = None,
    add: bool = False,
) -> Atlas:
    """Scan every head of ``model`` with the chosen probe batteries and return an :class:`Atlas`.

    ``model`` is anything :func:`headatlas.load` takes, or a :class:`LoadedModel`. ``texts``
    scans exactly those texts (one sequence each) in place of the natural battery; ``text_file``
    packs its lines into ``seq_len``-token sequences instead of UD English EWT. With ``out``,
    partial statistics are saved after every batch (``resume=True`` continues them) and the atlas
    is written there at the end. Scores and their papers: see :mod:`headatlas.detectors`.

    ``probes`` may also name functional batteries (``needle``, ``ordinal``, ``copy``,
    ``translate``, ``syntax``; :mod:`headatlas.functional`), which run after the attention
    batteries with ``n_functional`` prompts each (``None``: each battery's default) and, for
    ``needle``, prompts of at most ``max_len`` tokens. Each finished functional battery is saved,
    so ``resume=True`` skips it.

    ``add=True`` adds the chosen batteries' columns to the atlas already in ``out`` (made from the
    same model): its other columns, tables and examples stay, roles are reassigned from every score.
    """
    out_dir = Path(out) if out is not None else None
    if add and (out_dir is None or not (out_dir / TABLE_FILE).exists()):
        raise HeadatlasError("--add needs an existing atlas in --out: scan it first, or drop --add")
    if out_dir is not None:
        check_out_dir(out_dir, force, resume or add)
    loaded = model if isinstance(model, LoadedModel) else load(model, device=device, dtype=dtype)
    base = None
    if add and out_dir is not None:
        base = Atlas.load(out_dir)
        check_same_model(base, loaded, str(out_dir))
    started = time.perf_counter()
    batteries = build_batteries(loaded, probes, texts, text_file, n_prompts, seq_len, seed)
    functional = [p for p in dict.fromkeys(probes) if p in FUNCTIONAL_BATTERIES]
    config = FunctionalConfig(n_prompts=n_functional, max_len=max_len, seed=seed, batch_size=batch_size)
    scan_key = _scan_fingerprint(loaded, batteries, batch_size, functional, config)
    if out_dir is not None and force and not resume and has_partial(out_dir):
        discard_partial(out_dir)
    if (
        base is None
        and out_dir is not None
        and resume
        and not has_partial(out_dir)
        and (out_dir / TABLE_FILE).exists()
    ):
        finished = Atlas.load(out_dir)
        if finished.meta.get("fingerprint") != scan_key:
            raise HeadatlasError(
                f"{str(out_dir)!r} holds a finished atlas made with other settings: pass --force to rescan"
            )
        logger.info("%s already holds this atlas: nothing to resume", out_dir)
        return finished
    if batteries:
        result = run_scan(
            loaded, batteries, batch_size, checkpoint_dir=out_dir, resume=resume, on_batch=on_batch
        )
    else:
        info = loaded.info
        result = ScanResult(HeadStats(info.n_layers, info.n_heads), loaded, {"batteries": {}, "tokens": 0})
    tables: dict[str, pd.DataFrame] = {}
    if functional:

        def progress(battery: str, done: int, total: int) -> None:
            if on_batch is not None:
                on_batch(BatchDone(battery, done, total, 0, 0))

        ran = run_functional(loaded, functional, config, out_dir, resume, scan_key, progress)
        result.stats = result.stats.merge(ran.stats)
        result.meta["batteries"] = {**result.meta.get("batteries", {}), **ran.params}
        tables = ran.tables
    result.meta["fingerprint"] = scan_key
    extra = {
        "seed": seed,
        "probes": list(dict.fromkeys(probes)),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    atlas = Atlas.from_scan(result, extra)
    atlas.tables = tables
    if batteries:
        atlas.examples = collect_examples(loaded, batteries)
    if base is not None:
        atlas = merge_atlases(base, atlas)
    if out_dir is not None:
        atlas.save(out_dir)
        discard_partial(out_dir)
    return atlas
