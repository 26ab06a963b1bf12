"""Head-level circuits of a task by several rankings, measured by faithfulness curves (Mueller et
al. 2025, MIB): the results file, the figure, atlas columns and the side-by-side comparison.

For each method the heads are ranked on the task's clean / counterfactual pairs (:mod:`.rankings`)
and the ranking's faithfulness curve is measured with the chosen ablation (:mod:`.faithfulness`).
Following MIB, a ranking is read two ways: by signed score (heads that push the answer first; its
curve gives **CPR**) and by absolute score (heads that matter either way; its curve gives **CMD**).
Random rankings are drawn with several seeds; their curves are averaged and each seed's CPR / CMD
kept. Every method's wall time is recorded apart from the curve's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...atlas.table import Atlas
from ...core.errors import HeadatlasError, check_choice
from ...core.heads import head_name
from ...core.progress import Progress
from ...core.storage import atomic_path
from ...model.info import LoadedModel
from ..common.circuit_tasks import encode_exact
from ..common.patch_tasks import PatchTask
from .faithfulness import (
    ABLATIONS,
    THRESHOLD,
    Curve,
    Prepared,
    areas,
    faithfulness_curve,
    full_sizes,
    minimal_size,
    prepare,
    stable_size,
)
from .rankings import METHODS, atlas_scores, method_scores, order_by, random_order

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The circuit sizes of MIB's curves, as fractions of the scored components (Mueller et al. 2025)."""
RESULTS = "circuit.json"
FIGURE = "circuit.png"


def default_sizes(total: int) -> list[int]:
    """Return the default sizes for ``total`` heads: MIB's fractions of the heads and the powers of two."""
    ks = {int(f * total) for f in MIB_FRACTIONS}
    k = 1
    while k < total:
        ks.add(k)
        k *= 2
    return full_sizes(sorted(ks), total)


def mib_areas(sizes: Sequence[int], faithfulness: Sequence[float], total: int) -> tuple[float, float] | None:
    """Return ``(CPR, CMD)`` on MIB's own grid (x = its fractions, f at ``int(fraction · total)``
    heads), or ``None`` when a needed size was not measured."""
    at = dict(zip(sizes, faithfulness, strict=True))
    points = [at.get(int(frac * total)) for frac in MIB_FRACTIONS]
    if any(p is None for p in points):
        return None
    return areas([round(f * 1000) for f in MIB_FRACTIONS], [float(p) for p in points if p is not None], 1000)


@dataclass
class CircuitResult:
    """What :func:`measure_circuits` measured: the task, the baselines and one entry per method."""

    model: str
    task: PatchTask
    ablation: str
    total_heads: int
    n_heads: int
    baseline: dict[str, float]
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    """``method -> [layer, head]`` (mean effect as a share of the clean − counterfactual gap)."""

    def as_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready data (what ``circuit.json`` holds)."""
        return {
            "model": self.model,
            "task": self.task.name,
            "task_params": self.task.params or {},
            "ablation": self.ablation,
            "total_heads": self.total_heads,
            "threshold": THRESHOLD,
            "baseline": self.baseline,
            "methods": self.methods,
        }


def _curve_entry(curve: Curve, total: int) -> dict[str, Any]:
    entry = curve.as_dict()
    mib = mib_areas(curve.sizes, curve.faithfulness, total)
    if mib is not None:
        entry["cpr_mib_grid"], entry["cmd_mib_grid"] = round(mib[0], 6), round(mib[1], 6)
    return entry


def _random_entry(curves: list[Curve], seeds: Sequence[int], total: int) -> dict[str, Any]:
    f = np.mean([c.faithfulness for c in curves], axis=0).tolist()
    sizes = curves[0].sizes
    cpr, cmd = areas(sizes, f, total)
    return {
        "sizes": sizes,
        "faithfulness": [round(v, 6) for v in f],
        "cpr": round(cpr, 6),
        "cmd": round(cmd, 6),
        "minimal_k": minimal_size(sizes, f),
        "stable_k": stable_size(sizes, f),
        "seeds": list(seeds),
        "per_seed": [
            {"seed": s, "cpr": round(c.cpr, 6), "cmd": round(c.cmd, 6), "minimal_k": c.minimal_k}
            for s, c in zip(seeds, curves, strict=True)
        ],
        "cpr_std": round(float(np.std([c.cpr for c in curves])), 6),
        "cmd_std": round(float(np.std([c.cmd for c in curves])), 6),
        "curve_seconds": round(sum(c.seconds for c in curves), 3),
    }


def correct_pairs(task: PatchTask, prep: Prepared) -> PatchTask:
    """Return ``task`` with only the pairs whose clean answer beats the wrong one in ``prep`` (as
    circuit papers filter their prompts); raise :class:`HeadatlasError` when fewer than two remain."""
    drawn = len(task.pairs)
    right = tuple(p for p, m in zip(task.pairs, prep.clean_metric.tolist(), strict=True) if m > 0)
    if len(right) < 2:
        raise HeadatlasError(
            f"the model answers {len(right)} of {drawn} pairs of {task.name!r} right: too few"
        )
    return replace(task, pairs=right, params={**(task.params or {}), "only_correct": True, "drawn": drawn})


def measure_circuits(
    loaded: LoadedModel,
    task: PatchTask,
    methods: Sequence[str] = ("eap-ig", "attribution", "random"),
    ablation: str = "mean",
    sizes: Sequence[int] | None = None,
    steps: int = 8,
    seeds: Sequence[int] = (0, 1, 2),
    atlas: Atlas | None = None,
    rows_per_pass: int = 64,
    progress: Progress | None = None,
    only_correct: bool = False,
) -> CircuitResult:
    """Return the faithfulness curves, CPR, CMD, minimal circuit and times of each of ``methods``
    (``activation``, ``attribution``, ``eap-ig``, ``random``, ``atlas:<score>``) on ``task``.

    ``sizes`` default to :func:`default_sizes`; 0 and all heads are always measured. The model's own
    accuracy (answer above the wrong answer on clean prompts) and metrics come first in ``baseline``.
    ``only_correct`` keeps the pairs the model gets right (as circuit papers filter their prompts);
    ``baseline`` then also gives how many were drawn and the accuracy on all of them.
    """
    check_choice("ablation", ablation, ABLATIONS)
    if not methods:
        raise HeadatlasError("no method given: use activation, attribution, eap-ig, random or atlas:<score>")
    info = loaded.info
    total = info.n_layers * info.n_heads
    for method in methods:
        if method not in METHODS and not method.startswith("atlas:"):
            raise HeadatlasError(f"unknown method {method!r}: use {', '.join(METHODS)} or atlas:<score>")
        if method.startswith("atlas:") and atlas is None:
            raise HeadatlasError(f"method {method!r} reads an atlas: give one (--atlas DIR)")
    start = time.perf_counter()
    prep = prepare(loaded, encode_exact(loaded, task))
    accuracy, drawn = prep.accuracy, len(task.pairs)
    if only_correct:
        task = correct_pairs(task, prep)
        prep = prepare(loaded, encode_exact(loaded, task))
    baseline = {
        "n_pairs": len(task.pairs),
        "drawn_pairs": drawn,
        "only_correct": only_correct,
        "drawn_accuracy": round(accuracy, 4),
        "clean_accuracy": round(prep.accuracy, 4),
        "clean_metric": round(float(prep.clean_metric.mean()), 6),
        "counterfactual_metric": round(float(prep.corrupt_metric.mean()), 6),
        "prepare_seconds": round(time.perf_counter() - start, 3),
    }
    result = CircuitResult(info.name, task, ablation, total, info.n_heads, baseline)
    ks = full_sizes(sizes if sizes is not None else default_sizes(total), total)
    for index, method in enumerate(methods):
        step = (
            (lambda d, t, i=index: progress(i * 100 + d * 100 // max(t, 1), 100 * len(methods)))
            if progress
            else None
        )
        if method == "random":
            curves = [
                faithfulness_curve(
                    loaded, prep, random_order(info.n_layers, info.n_heads, s), ks, ablation, rows_per_pass
                )
                for s in seeds
            ]
            result.methods[method] = _random_entry(curves, seeds, total)
            continue
        if method.startswith("atlas:"):
            t0 = time.perf_counter()
            score = atlas_scores(atlas, method[6:])  # type: ignore[arg-type]  # checked above
            seconds = time.perf_counter() - t0
        else:
            score, seconds = method_scores(loaded, prep, method, steps, rows_per_pass, step)
        result.scores[method] = score
        signed = faithfulness_curve(loaded, prep, order_by(score), ks, ablation, rows_per_pass)
        absolute = faithfulness_curve(
            loaded, prep, order_by(score, absolute=True), ks, ablation, rows_per_pass
        )
        result.methods[method] = {
            "cpr": round(signed.cpr, 6),
            "cmd": round(absolute.cmd, 6),
            "minimal_k": signed.minimal_k,
            "stable_k": signed.stable_k,
            "ranking_seconds": round(seconds, 3),
            "curve_seconds": round(signed.seconds + absolute.seconds, 3),
            "top": [head_name(*h) for h in order_by(score)[:10]],
            "steps": steps if method == "eap-ig" else None,
            "signed": _curve_entry(signed, total),
            "absolute": _curve_entry(absolute, total),
        }
    return result


def figure_curve(entry: dict[str, Any]) -> dict[str, Any]:
    """Return the curve a figure draws for a method entry: the signed ranking's curve, labelled with
    the method's reported CPR (signed curve) and CMD (absolute curve)."""
    return {**entry.get("signed", entry), "cpr": entry["cpr"], "cmd": entry["cmd"]}


def write_results(result: CircuitResult, out: str | Path) -> list[Path]:
    """Write ``circuit.json``, the task's pairs (``pairs.jsonl``), the scores (``scores.csv``) and the
    figure into the folder ``out``; return the paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / RESULTS, folder / "pairs.jsonl", folder / "scores.csv"]
    with atomic_path(paths[0], suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    with atomic_path(paths[1], suffix=".jsonl") as tmp:
        rows = (
            {"clean": p.clean, "corrupt": p.corrupt, "answer": p.answer, "wrong": p.wrong}
            for p in result.task.pairs
        )
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_layers, n_heads = result.total_heads // result.n_heads, result.n_heads
    table = pd.DataFrame(
        {m: s.ravel() for m, s in result.scores.items()},
        index=[head_name(layer, head) for layer in range(n_layers) for head in range(n_heads)],
    )
    with atomic_path(paths[2], suffix=".csv") as tmp:
        table.to_csv(tmp, index_label="head")
    from .circuit_figures import curves_figure

    curves = {name: figure_curve(entry) for name, entry in result.methods.items()}
    paths.append(
        curves_figure(
            curves,
            result.total_heads,
            f"{result.model} — {result.task.name} ({result.ablation} ablation)",
            folder / FIGURE,
        )
    )
    return paths


_OPERATOR_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divide"}


def circuit_column(task: str) -> str:
    """Return the atlas column of ``task``'s circuit: ``circuit_<task>`` with operators spelled out
    (``arithmetic:+`` → ``circuit_arithmetic_plus``) and every other non-alphanumeric as ``_``."""
    base, colon, sub = task.lower().partition(":")
    if base == "arithmetic":
        sub = "_".join(_OPERATOR_WORDS.get(c, c) for c in sub)
    spelled = base + colon + sub
    safe = "".join(c if c.isalnum() else "_" for c in spelled)
    return "circuit_" + "_".join(part for part in safe.split("_") if part)


def _meta_entry(result: CircuitResult, method: str, order: list[tuple[int, int]]) -> dict[str, Any]:
    k = result.methods[method]["minimal_k"]
    keys = ("cpr", "cmd", "minimal_k", "stable_k", "cpr_std", "cmd_std", "ranking_seconds")
    methods = {}
    for name, entry in result.methods.items():
        curve = entry.get("signed", entry)
        methods[name] = {
            **{key: entry[key] for key in keys if entry.get(key) is not None},
            "sizes": list(curve["sizes"]),
            "faithfulness": [round(float(f), 4) for f in curve["faithfulness"]],
        }
    return {
        "column": circuit_column(result.task.name),
        "method": method,
        "ablation": result.ablation,
        "minimal_k": k,
        "threshold": THRESHOLD,
        "total_heads": result.total_heads,
        "n_pairs": result.baseline["n_pairs"],
        "clean_accuracy": result.baseline["clean_accuracy"],
        "heads": [head_name(*h) for h in order[: k or 0]],
        "methods": methods,
        **{m: {"cpr": e["cpr"], "cmd": e["cmd"]} for m, e in result.methods.items()},
    }


def write_circuit_columns(atlas: Atlas, result: CircuitResult) -> list[str]:
    """Add ``circuit_<task>`` (1 for the heads of the smallest circuit with f ≥ 0.9 by the first scored
    method, else 0) and ``circuit_<task>_rank`` (each head's rank by that method, 1 = most important)
    to ``atlas``; return the columns written. ``atlas.meta["circuits"][task]`` records the method, the
    ablation, the minimal circuit's heads (``heads``, most important first), the model's accuracy and
    every method's CPR / CMD / minimal k and signed faithfulness curve (``methods``; Mueller et al.
    2025), which is what ``headatlas report`` shows."""
    scored = [m for m in result.methods if m in result.scores]
    if not scored:
        return []
    method = scored[0]
    score = result.scores[method]
    column = circuit_column(result.task.name)
    order = order_by(score)
    rank = np.zeros(score.shape)
    for position, (layer, head) in enumerate(order, start=1):
        rank[layer, head] = position
    k = result.methods[method]["minimal_k"]
    atlas.set_matrix(column, (rank <= (k if k is not None else 0)).astype(float))
    atlas.set_matrix(f"{column}_n", np.full(score.shape, len(result.task.pairs)))
    atlas.set_matrix(f"{column}_rank", rank)
    atlas.meta.setdefault("circuits", {})[result.task.name] = _meta_entry(result, method, order)
    return [column, f"{column}_rank"]


def read_results(folder: str | Path) -> dict[str, Any]:
    """Read ``circuit.json`` of a results folder; one-line error when it is missing or not JSON."""
    path = Path(folder) / RESULTS
    if not path.is_file():
        raise HeadatlasError(f"{folder} holds no {RESULTS}: give folders written by headatlas circuit")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HeadatlasError(f"{path} is not JSON ({exc.msg})") from None
    return data


def compare_results(folders: Sequence[str | Path]) -> pd.DataFrame:
    """Return one row per (folder, method): model, task, ablation, accuracy, CPR, CMD, minimal k, times."""
    rows = []
    for folder in folders:
        data = read_results(folder)
        for method, entry in data["methods"].items():
            rows.append({
                "run": str(folder), "model": data["model"], "task": data["task"], "ablation": data["ablation"],
                "accuracy": data["baseline"]["clean_accuracy"], "method": method, "cpr": entry["cpr"],
                "cmd": entry["cmd"], "minimal_k": entry["minimal_k"], "stable_k": entry.get("stable_k"), "total_heads": data["total_heads"],
                "ranking_s": entry.get("ranking_seconds", 0.0), "curve_s": entry.get("curve_seconds"),
            })  # fmt: skip
    return pd.DataFrame(rows)
