"""Head pruning measured by perplexity, and the prune curve of Michel et al. 2019.

``prune_model`` physically removes query heads (see :mod:`headatlas.model.surgery` for what is removed
and how GQA groups stay consistent) and saves a checkpoint :func:`headatlas.load` reloads.
``prune_curve`` is Figure 3 of Michel et al. 2019 ("Are Sixteen Heads Really Better than One?")
on our models: perplexity on held-out text after removing a growing fraction of heads, in
ascending importance, against random orders (Voita et al. 2019 prune heads with learned gates;
this is the simpler importance-ordered removal). Heads are chosen on EWT ``dev`` and perplexity is
measured on EWT ``test``. The curve silences heads with zero gates (:func:`headatlas.ablate`),
which gives exactly the logits of physical removal (tested), at no copying cost.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...atlas.table import Atlas, open_atlas
from ...capture import ablate
from ...core.errors import HeadatlasError, check_at_least, check_number, param
from ...core.heads import Head, head_name
from ...core.outputs import Folder, check_output_folder, output_folder
from ...core.progress import Progress
from ...core.storage import write_json
from ...model.info import LoadedModel
from ...model.surgery import apply_layouts, attention_modules, plan_layouts, record_layouts
from ..common.evaluation import EvalData, count_params, forward_seconds, perplexity

if TYPE_CHECKING:
    from ...scanning.parallel import WorkerPool

logger = logging.getLogger(__name__)


def check_fraction(fraction: float, name: str = "fraction", allow_zero: bool = True) -> None:
    """Refuse a fraction outside [0, 1) (or (0, 1) without ``allow_zero``: pruning nothing is no
    pruning, while a prune curve starts from the whole model)."""
    check_number(name, fraction)
    if not allow_zero and fraction == 0:
        raise HeadatlasError(f"{param(name)} 0 removes no head: give e.g. 0.2 to remove 20% of heads")
    if not 0.0 <= fraction < 1.0:
        raise HeadatlasError(
            f"{param(name)} {fraction} is outside [0, 1): give e.g. 0.2 to remove 20% of heads"
        )


def order_heads(scores: np.ndarray) -> list[Head]:
    """Heads in ascending ``scores`` (``[layer, head]``; NaN last); ties broken by layer, head."""
    flat = np.nan_to_num(scores.astype(float), nan=np.inf).ravel()
    order = np.lexsort((np.arange(flat.size), flat))
    n_heads = scores.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def random_order(n_layers: int, n_heads: int, seed: int) -> list[Head]:
    """A seeded random order of all heads."""
    check_at_least("seed", seed, 0)
    rng = np.random.default_rng(seed)
    return [(int(i) // n_heads, int(i) % n_heads) for i in rng.permutation(n_layers * n_heads)]


def select(
    order: list[Head], count: int, n_layers: int, n_heads: int, allow_empty_layers: bool
) -> list[Head]:
    """The first ``count`` heads of ``order``, skipping any that would empty a layer (Michel et al.
    keep at least one head per layer) unless ``allow_empty_layers``."""
    limit = n_layers * n_heads - (0 if allow_empty_layers else n_layers)
    if count > limit:
        raise HeadatlasError(
            f"cannot remove {count} heads: at most {limit} can go while keeping one head per layer "
            f"(lower {param('fraction')} or pass {param('allow_empty_layers', 'allow_empty_layers=True')})"
        )
    left = dict.fromkeys(range(n_layers), n_heads)
    chosen: list[Head] = []
    for layer, head in order:
        if len(chosen) == count:
            break
        if left[layer] > 1 or allow_empty_layers:
            chosen.append((layer, head))
            left[layer] -= 1
    return chosen


def prune_model(
    loaded: LoadedModel, heads: list[Head], allow_empty_layers: bool = False
) -> tuple[LoadedModel, bool]:
    """Return a pruned copy of ``loaded`` (the original is untouched) and whether plain
    transformers can reload it (every layer ends with the same shape)."""
    info = loaded.info
    attention_modules(loaded.model)  # clear error for families that cannot be pruned
    layouts = plan_layouts(heads, info.n_layers, info.n_heads, info.n_kv_heads, allow_empty_layers)
    model = copy.deepcopy(loaded.model)
    apply_layouts(model, layouts, info.head_dim)
    plain = record_layouts(model, layouts, info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim)
    return LoadedModel(model.eval(), loaded.tokenizer, info), plain


PRUNE_REPORT = "headatlas-prune.json"
"""Written into every pruned checkpoint; marks a directory ``prune`` may replace."""


CURVE_FOLDER = Folder("prune-curve", "prune-curve.json")
"""Where ``prune-curve`` writes ``prune-curve.json`` and ``prune-curve.png``."""
PRUNE_FOLDER = Folder("prune", PRUNE_REPORT)
"""The pruned checkpoint folder: ``prune`` replaces a folder holding :data:`PRUNE_REPORT` whole."""


def check_prune_output(out: str | Path, model: str | None = None, force: bool = False) -> None:
    """Refuse a checkpoint directory ``prune`` must not write, before any work
    (:func:`~headatlas.core.outputs.check_output_folder`): a file, an atlas, a model's directory
    (``model``: the spec or source the model is loaded from), or a non-empty directory ``prune`` did
    not write unless ``force`` (then the checkpoint is written beside what is there)."""
    check_output_folder(out, PRUNE_FOLDER, force, model=model)


def save_pruned(pruned: LoadedModel, out: Path, report: dict[str, object] | None = None) -> Path:
    """Write the pruned model, tokenizer and ``report`` to ``out`` atomically (safetensors).

    Everything is written into a temporary directory next to ``out`` that then replaces it, so a
    Ctrl-C while saving leaves the old directory (or none), never old and new files mixed; a
    directory ``prune`` did not write (allowed by ``force``) keeps its other files
    (:func:`~headatlas.core.outputs.output_folder`).
    """
    out = Path(out)
    with output_folder(out, PRUNE_FOLDER) as tmp:
        pruned.model.save_pretrained(tmp)
        pruned.tokenizer.save_pretrained(tmp)
        if report is not None:
            write_json(tmp / PRUNE_REPORT, report)
    return out


@dataclass
class PruneReport:
    """What ``headatlas prune`` measured (``--json`` prints :meth:`to_dict`)."""

    heads_removed: list[str]
    n_heads_removed: int
    n_heads_total: int
    params_before: int
    params_after: int
    perplexity_before: float
    perplexity_after: float
    speedup: float
    seconds_before: float
    seconds_after: float
    plain_transformers_reload: bool
    out: str
    eval: dict[str, object]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return asdict(self)


def run_prune(
    loaded: LoadedModel,
    heads: list[Head],
    data: EvalData,
    out: Path,
    allow_empty_layers: bool = False,
    progress: Progress | None = None,
) -> PruneReport:
    """Prune ``heads``, save to ``out``, and measure params, perplexity and forward time before/after."""
    pruned, plain = prune_model(loaded, heads, allow_empty_layers)
    ppl_before = perplexity(loaded, data, progress)
    ppl_after = perplexity(pruned, data, progress)
    t_before = forward_seconds(loaded, data.batches[0])
    t_after = forward_seconds(pruned, data.batches[0])
    report = PruneReport(
        heads_removed=[head_name(layer, head) for layer, head in heads],
        n_heads_removed=len(heads),
        n_heads_total=loaded.info.n_layers * loaded.info.n_heads,
        params_before=count_params(loaded.model),
        params_after=count_params(pruned.model),
        perplexity_before=ppl_before,
        perplexity_after=ppl_after,
        speedup=t_before / t_after,
        seconds_before=t_before,
        seconds_after=t_after,
        plain_transformers_reload=plain,
        out=str(out),
        eval=data.describe(),
    )
    save_pruned(pruned, out, report.to_dict())
    return report


def ablated_perplexity(loaded: LoadedModel, heads: list[Head], data: EvalData) -> float:
    """Perplexity with ``heads`` zero-gated (equal to physical removal)."""
    if not heads:
        return perplexity(loaded, data)
    with ablate(loaded, heads, mode="zero"):
        return perplexity(loaded, data)


def _curve_point(
    loaded: LoadedModel, job: tuple[str, int, int, list[Head], EvalData]
) -> tuple[str, int, int, float]:
    name, run, index, heads, data = job
    return name, run, index, ablated_perplexity(loaded, heads, data)


def prune_curve(
    loaded: LoadedModel,
    orders: dict[str, list[list[Head]]],
    fractions: list[float],
    data: EvalData,
    allow_empty_layers: bool = False,
    progress: Progress | None = None,
    pool: WorkerPool | None = None,
) -> dict[str, object]:
    """Perplexity at each fraction for each ordering (several orders per name: mean ± std).

    ``orders`` maps a name (``importance``, ``random``, a score) to one or more head orders. The
    unablated point is computed once. With ``pool`` the (order, fraction) points run on its Ray
    workers in parallel.
    """
    info = loaded.info
    total = info.n_layers * info.n_heads
    for fraction in fractions:
        check_fraction(fraction)
    jobs = []
    for name, runs in orders.items():
        for r, order in enumerate(runs):
            for f, fraction in enumerate(fractions):
                heads = select(
                    order, round(fraction * total), info.n_layers, info.n_heads, allow_empty_layers
                )
                jobs.append((name, r, f, heads, data))
    unique = {job[0:3]: job for job in jobs if job[3]}
    needs_base = any(not job[3] for job in jobs)
    todo = list(unique.values()) + ([("", 0, 0, [], data)] if needs_base else [])
    points = (
        (_curve_point(loaded, job) for job in todo)
        if pool is None
        else pool.map_unordered(_curve_point, todo)
    )
    found: dict[tuple[str, int, int], float] = {}
    for done, (name, run, index, value) in enumerate(points, start=1):
        found[(name, run, index)] = value
        if progress:
            progress(done, len(todo))
    curves: dict[str, object] = {}
    for name, runs in orders.items():
        values = np.zeros((len(runs), len(fractions)))  # [run, fraction]
        for job_name, r, f, heads, _data in jobs:
            if job_name == name:
                values[r, f] = found[(name, r, f)] if heads else found[("", 0, 0)]
        curves[name] = {
            "mean": values.mean(axis=0).tolist(),
            "std": values.std(axis=0).tolist(),
            "runs": values.tolist(),
        }
    return {
        "model": info.name,
        "sha256": info.sha256,
        "fractions": fractions,
        "heads_removed": [round(f * total) for f in fractions],
        "n_heads": total,
        "curves": curves,
        "eval": data.describe(),
        **({"parallel": pool.describe()} if pool is not None else {}),
    }


def plot_curve(result: dict[str, object], path: Path) -> Path:
    """Draw perplexity against the fraction of heads removed (mean, min–max band over runs) to ``path``."""
    from matplotlib.figure import Figure

    from ...report.figures import save_figure

    fractions = np.asarray(result["fractions"], dtype=float)
    curves = result["curves"]
    if not isinstance(curves, dict):
        raise TypeError("result has no curves")
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for name, curve in curves.items():
        mean = np.asarray(curve["mean"])
        runs = np.asarray(curve["runs"])  # [run, fraction]
        label = f"{name} (mean of {len(runs)}, band min–max)" if len(runs) > 1 else name
        (line,) = ax.plot(fractions * 100, mean, marker="o", label=label)
        if len(runs) > 1:  # min–max, not mean ± std: std bands cross zero on a log axis
            ax.fill_between(fractions * 100, runs.min(0), runs.max(0), alpha=0.2, color=line.get_color())
    ax.set_xlabel("heads removed (%)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_yscale("log")
    ax.set_title(f"{result['model']}: head pruning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def head_orders(
    loaded: LoadedModel,
    by: str,
    atlas_dir: str | Path | None,
    seeds: int = 1,
    progress: Progress | None = None,
) -> dict[str, list[list[Head]]]:
    """Return the head orders (ascending, least important first) for each name in ``by``.

    ``by`` is comma-separated: ``random`` (``seeds`` seeded orders), ``importance`` (the atlas's
    ``importance_gradient`` column when ``atlas_dir`` holds one, else Michel et al.'s gradient
    importance computed on 16 × 256 tokens of EWT dev), or any numeric score column of the atlas.
    """
    from ..common.evaluation import heldout_data
    from .importance import gradient_importance

    info = loaded.info
    names = [b.strip() for b in by.split(",") if b.strip()]
    if not names:
        raise HeadatlasError(f"{param('by')} is empty: use importance, random or an atlas score")
    atlas: Atlas | None = open_atlas(loaded.info, atlas_dir) if atlas_dir is not None else None
    orders: dict[str, list[list[Head]]] = {}
    for name in names:
        if name == "random":
            orders[name] = [random_order(info.n_layers, info.n_heads, seed) for seed in range(seeds)]
            continue
        column = "importance_gradient" if name == "importance" else name
        if atlas is not None and column in atlas.table.columns:
            scores = atlas.matrix(column)
        elif name == "importance":
            data = heldout_data(loaded, "natural", "dev", 16, 256, 4)
            scores = gradient_importance(loaded, data, progress).scores
        else:
            raise HeadatlasError(
                f"{param('by')} {name!r}: no such column in the atlas (give {param('atlas')} DIR holding it), "
                "or use importance/random"
            )
        orders[name] = [order_heads(scores)]
    return orders
