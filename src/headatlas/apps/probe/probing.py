"""Head induction analysis: a linear probe on every head's output, with the controls that make it mean something.

Each query head's output ``z`` (the input of the attention output projection, Li et al. 2023's
place; read through the one head-output hook :func:`headatlas.capture.head_outputs`, so GQA
models have ``n_heads`` of them) is collected at the task's labelled positions in one forward pass
per batch, and all layers × heads multinomial logistic regressions are trained together
(:mod:`.logreg`). Reported per head (Hewitt & Liang 2019, "Designing and Interpreting Probes with
Control Tasks"):

- ``accuracy``: test accuracy, L2 strength shared by every head and chosen on dev;
- ``control_accuracy``: the same probe (same L2) on the control task; ``selectivity`` =
  accuracy − control accuracy;
- ``random_init_accuracy``: the same probe on a randomly initialised copy of the model (same
  architecture, seeded): what the architecture and the token identities alone give;
- ``majority``: the most frequent training label's rate on test;

each as a mean (and std) over seeds (a seed draws the training sentences or the fact split, the
control labels and the random copy).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ...core.errors import check_at_least
from ...core.progress import Progress
from ...model.info import LoadedModel
from ...model.load import load
from ..common.head_features import collect_features, random_init_copy
from ..common.logreg import L2_GRID, LogReg, Standardiser, choose_l2, fit_logreg, standardise
from ..common.probe_tasks import ProbeTask, build_probe_task, with_controls

SIDE_TABLE = "probes"
"""Side table of every probe run: ``DIR/probes.parquet``."""


def _label_ids(labels: Sequence[str], classes: Sequence[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[label] for label in labels], dtype=torch.long)  # [n]


@dataclass
class SplitFeatures:
    """Standardised features of the three splits, ``[group, n, d]`` each, and their scaler."""

    train: torch.Tensor
    dev: torch.Tensor
    test: torch.Tensor
    scaler: Standardiser


def features(loaded: LoadedModel, task: ProbeTask, batch_size: int = 16) -> SplitFeatures:
    """Collect and standardise (on train) every head's features for each split of ``task``."""
    raw = {
        split: collect_features(loaded, task.splits[split], batch_size) for split in ("train", "dev", "test")
    }
    scaler = standardise(raw["train"])
    return SplitFeatures(scaler(raw["train"]), scaler(raw["dev"]), scaler(raw["test"]), scaler)


@dataclass
class ProbeRun:
    """One seed's probes: ``[layer, head]`` arrays of test/dev accuracy for the task, the control
    task and the random-init model, the majority rate and the chosen L2."""

    accuracy: np.ndarray
    dev_accuracy: np.ndarray
    control_accuracy: np.ndarray
    random_init_accuracy: np.ndarray
    majority: float
    l2: float
    l2_path: dict[float, float]
    n_train: int
    n_test: int
    fit: LogReg | None = None
    scaler: Standardiser | None = None


def _grid(values: torch.Tensor, loaded: LoadedModel) -> np.ndarray:
    return values.reshape(loaded.info.n_layers, loaded.info.n_heads).numpy().astype(float)  # [layer, head]


def probe_seed(
    loaded: LoadedModel,
    task: ProbeTask,
    seed: int,
    random_init: bool = True,
    grid: Sequence[float] = L2_GRID,
    max_iter: int = 100,
    batch_size: int = 16,
    l2: float | None = None,
) -> ProbeRun:
    """Run one seed of the probes of ``task`` on every head: task (at ``l2``, or the L2 of ``grid``
    chosen on dev when ``None``), control task, and with ``random_init`` a random-init copy."""
    n_classes = len(task.classes)
    ys = {split: _label_ids(task.labels(split), task.classes) for split in ("train", "dev", "test")}
    feats = features(loaded, task, batch_size)
    if l2 is None:
        fit, path = choose_l2((feats.train, ys["train"]), (feats.dev, ys["dev"]), n_classes, grid, max_iter)
    else:
        fit = fit_logreg(feats.train, ys["train"], n_classes, l2, max_iter)
        path = {l2: float(fit.accuracy(feats.dev, ys["dev"]).mean())}
    l2 = fit.l2
    control = with_controls(task, seed)
    yc = {split: _label_ids(control.labels(split), task.classes) for split in ("train", "test")}
    control_fit = fit_logreg(feats.train, yc["train"], n_classes, l2, max_iter)
    control_acc = control_fit.accuracy(feats.test, yc["test"])
    if random_init:
        other = random_init_copy(loaded, seed)
        rfeats = features(other, task, batch_size)
        random_acc = fit_logreg(rfeats.train, ys["train"], n_classes, l2, max_iter).accuracy(
            rfeats.test, ys["test"]
        )
        del other, rfeats
    else:
        random_acc = torch.full((feats.train.shape[0],), float("nan"))
    counts = torch.bincount(ys["train"], minlength=n_classes)
    majority = float((ys["test"] == counts.argmax()).float().mean())
    return ProbeRun(
        accuracy=_grid(fit.accuracy(feats.test, ys["test"]), loaded),
        dev_accuracy=_grid(fit.accuracy(feats.dev, ys["dev"]), loaded),
        control_accuracy=_grid(control_acc, loaded),
        random_init_accuracy=_grid(random_acc, loaded),
        majority=majority,
        l2=l2,
        l2_path=path,
        n_train=int(ys["train"].numel()),
        n_test=int(ys["test"].numel()),
        fit=fit,
        scaler=feats.scaler,
    )


@dataclass
class ProbeResult:
    """Probes of one task over seeds: ``table`` has one row per head (``layer, head, accuracy,
    accuracy_std, control_accuracy, random_init_accuracy, selectivity, selectivity_std, majority,
    dev_accuracy``); ``params`` how it was run; ``runs`` every seed's :class:`ProbeRun`."""

    task: str
    column: str
    table: pd.DataFrame
    params: dict[str, Any]
    runs: list[ProbeRun] = field(default_factory=list)


def _mean_of_measured(grids: list[np.ndarray]) -> np.ndarray:
    """Mean ``[layer, head]`` over the seeds that measured a value (NaN where none did)."""
    stack = np.stack(grids)  # [seed, layer, head]
    measured = ~np.isnan(stack)
    count = measured.sum(0)
    total = np.where(measured, stack, 0.0).sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _summarise(runs: list[ProbeRun]) -> dict[str, np.ndarray]:
    acc = np.stack([r.accuracy for r in runs])  # [seed, layer, head]
    sel = np.stack([r.accuracy - r.control_accuracy for r in runs])  # [seed, layer, head]
    return {
        "accuracy": acc.mean(0),
        "accuracy_std": acc.std(0),
        "control_accuracy": np.stack([r.control_accuracy for r in runs]).mean(0),
        "random_init_accuracy": _mean_of_measured([r.random_init_accuracy for r in runs]),
        "selectivity": sel.mean(0),
        "selectivity_std": sel.std(0),
        "dev_accuracy": np.stack([r.dev_accuracy for r in runs]).mean(0),
    }


def run_probes(
    loaded: LoadedModel,
    task: str,
    n_sentences: int = 400,
    seeds: int = 3,
    random_init: bool = True,
    grid: Sequence[float] = L2_GRID,
    max_iter: int = 100,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> ProbeResult:
    """Probe every head of ``loaded`` on ``task`` over ``seeds`` seeds and return a :class:`ProbeResult`.

    The first seed chooses the L2 strength on dev and probes the random-init copy (a baseline that
    barely moves between seeds); later seeds reuse that L2 and skip the copy, so the default run
    stays within a few minutes on a CPU. Each seed draws its own training sample and control labels.
    """
    check_at_least("seeds", seeds, 1)
    check_at_least("n_sentences", n_sentences, 2)
    start = time.perf_counter()
    runs: list[ProbeRun] = []
    built: ProbeTask | None = None
    for seed in range(seeds):
        built = build_probe_task(loaded.tokenizer, task, n_sentences, seed)
        l2 = runs[0].l2 if runs else None
        runs.append(probe_seed(loaded, built, seed, random_init and not runs, grid, max_iter, batch_size, l2))
        if progress is not None:
            progress(seed + 1, seeds)
    assert built is not None  # seeds >= 1 (checked)
    summary = _summarise(runs)
    n_layers, n_heads = summary["accuracy"].shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    table = pd.DataFrame(
        {
            "layer": layer.ravel(),
            "head": head.ravel(),
            "task": built.name,
            **{k: v.ravel() for k, v in summary.items()},
            "majority": float(np.mean([r.majority for r in runs])),
            "seeds": seeds,
        }
    )
    params = {
        **built.params,
        "task": built.name,
        "level": built.level,
        "classes": list(built.classes),
        "seeds": seeds,
        "l2": [r.l2 for r in runs],
        "l2_dev_path": {str(k): v for k, v in runs[0].l2_path.items()},
        "n_train": [r.n_train for r in runs],
        "n_test": [r.n_test for r in runs],
        "majority": float(np.mean([r.majority for r in runs])),
        "random_init": random_init,
        "random_init_seeds": 1 if random_init else 0,
        "l2_chosen_on": "seed 0's dev split, reused by later seeds",
        "position": "first piece of each word" if built.level == "token" else "last token",
        "seconds": round(time.perf_counter() - start, 2),
    }
    return ProbeResult(built.name, built.column, table, params, runs)


def write_probes(atlas: Any, result: ProbeResult) -> list[str]:
    """Add ``probe_<task>`` (test accuracy) and ``probe_<task>_selectivity`` (each with ``_std``
    over seeds and ``_n`` test examples) to ``atlas``, the per-head rows to its ``probes`` side
    table (other tasks' rows kept), the parameters to ``meta["probe"][task]``; reassign roles.
    Returns the columns written."""
    n_layers, n_heads = atlas.shape

    def grid(name: str) -> np.ndarray:
        return result.table[name].to_numpy(dtype=float).reshape(n_layers, n_heads)  # [layer, head]

    n_test = np.full((n_layers, n_heads), float(np.mean(result.params["n_test"])))
    columns = [result.column, f"{result.column}_selectivity"]
    for column, name in zip(columns, ("accuracy", "selectivity"), strict=True):
        atlas.set_matrix(column, grid(name))
        atlas.set_matrix(f"{column}_std", grid(f"{name}_std"))
        atlas.set_matrix(f"{column}_n", n_test)
    old = atlas.tables.get(SIDE_TABLE)
    rows = result.table.drop(columns=["dev_accuracy"])
    if old is not None:
        rows = pd.concat([old[old["task"] != result.task], rows], ignore_index=True)
    atlas.tables[SIDE_TABLE] = rows.reset_index(drop=True)
    atlas.meta.setdefault("probe", {})[result.task] = {**result.params, "columns": columns}
    atlas.reassign_roles()
    return columns


def probe_figures(atlas: Any, result: ProbeResult, directory: Any) -> list[Any]:
    """Write the layer × head heatmaps of the task's accuracy and selectivity; return the paths."""
    from pathlib import Path

    from ...report.figures import score_figure

    out = Path(directory)
    return [score_figure(atlas, c, out / f"{c}.png") for c in (result.column, f"{result.column}_selectivity")]


def probe(
    model: LoadedModel | str,
    task: str = "upos",
    n_sentences: int = 400,
    seeds: int = 3,
    random_init: bool = True,
    out: Any = None,
) -> pd.DataFrame:
    """Return every head's probe of ``task`` as a DataFrame — ``ha.probe``.

    One row per head: ``layer, head, task, accuracy`` (test, mean over ``seeds``),
    ``accuracy_std``, ``control_accuracy`` (Hewitt & Liang 2019 control task), ``selectivity``
    (accuracy − control accuracy) and its std, ``random_init_accuracy`` (a randomly initialised
    copy of the model), ``majority``, ``dev_accuracy``, ``seeds``; the run's parameters in
    ``.attrs["params"]``. ``task`` is ``upos``, ``deprel``, ``word-start``, ``truth`` or a JSONL
    file. With ``out`` the result is also written into the atlas there (columns ``probe_<task>``,
    ``probe_<task>_selectivity``, side table ``probes.parquet``).
    """
    from ...atlas.table import open_atlas

    loaded = model if isinstance(model, LoadedModel) else load(model)
    result = run_probes(loaded, task, n_sentences, seeds, random_init)
    if out is not None:
        atlas = open_atlas(loaded.info, out)
        write_probes(atlas, result)
        atlas.save(out)
    table = result.table.copy()
    table.attrs["params"] = result.params
    return table
