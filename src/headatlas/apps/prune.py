"""Head pruning measured by perplexity, and the prune curve of Michel et al. 2019.

``prune_model`` physically removes query heads (see :mod:`headatlas.surgery` for what is removed
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
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..capture import ablate
from ..errors import HeadatlasError
from ..loading import LoadedModel
from ..surgery import apply_layouts, attention_modules, plan_layouts, record_layouts
from .evaluation import EvalData, Progress, count_params, forward_seconds, perplexity

logger = logging.getLogger(__name__)

Head = tuple[int, int]


def parse_heads(spec: str, n_layers: int, n_heads: int) -> list[Head]:
    """Parse ``"L.H,L.H"`` (``L3H1`` also accepted) into ``(layer, head)`` pairs, checking ranges."""
    heads: list[Head] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        text = part.upper().lstrip("L").replace("H", ".")
        try:
            layer, head = (int(x) for x in text.split("."))
        except ValueError:
            raise HeadatlasError(
                f"cannot read head {part!r}: write heads as LAYER.HEAD, e.g. 3.1,17.4"
            ) from None
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise HeadatlasError(f"no head {part}: the model has {n_layers} layers × {n_heads} heads")
        heads.append((layer, head))
    if not heads:
        raise HeadatlasError("--heads is empty: give heads as LAYER.HEAD,LAYER.HEAD")
    return list(dict.fromkeys(heads))


def check_fraction(fraction: float) -> None:
    """Refuse a fraction outside [0, 1)."""
    if not 0.0 <= fraction < 1.0:
        raise HeadatlasError(f"--fraction {fraction} is outside [0, 1): give e.g. 0.2 to remove 20% of heads")


def order_heads(scores: np.ndarray) -> list[Head]:
    """Heads in ascending ``scores`` (``[layer, head]``; NaN last); ties broken by layer, head."""
    flat = np.nan_to_num(scores.astype(float), nan=np.inf).ravel()
    order = np.lexsort((np.arange(flat.size), flat))
    n_heads = scores.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def random_order(n_layers: int, n_heads: int, seed: int) -> list[Head]:
    """A seeded random order of all heads."""
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
            "(lower --fraction or pass --allow-empty-layers)"
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


def save_pruned(pruned: LoadedModel, out: Path) -> Path:
    """Write the pruned model and tokenizer to ``out`` (safetensors)."""
    out.mkdir(parents=True, exist_ok=True)
    pruned.model.save_pretrained(out)
    pruned.tokenizer.save_pretrained(out)
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
    save_pruned(pruned, out)
    report = PruneReport(
        heads_removed=[f"{layer}.{head}" for layer, head in heads],
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
    (out / "headatlas-prune.json").write_text(json.dumps(report.to_dict(), indent=1))
    return report


def ablated_perplexity(loaded: LoadedModel, heads: list[Head], data: EvalData) -> float:
    """Perplexity with ``heads`` zero-gated (equal to physical removal)."""
    if not heads:
        return perplexity(loaded, data)
    with ablate(loaded, heads, mode="zero"):
        return perplexity(loaded, data)


def prune_curve(
    loaded: LoadedModel,
    orders: dict[str, list[list[Head]]],
    fractions: list[float],
    data: EvalData,
    allow_empty_layers: bool = False,
    progress: Progress | None = None,
) -> dict[str, object]:
    """Perplexity at each fraction for each ordering (several orders per name: mean ± std).

    ``orders`` maps a name (``importance``, ``random``, a score) to one or more head orders.
    """
    info = loaded.info
    total = info.n_layers * info.n_heads
    for fraction in fractions:
        check_fraction(fraction)
    steps = sum(len(v) for v in orders.values()) * len(fractions)
    done = 0
    cache: dict[int, float] = {}
    curves: dict[str, object] = {}
    for name, runs in orders.items():
        values = np.zeros((len(runs), len(fractions)))  # [run, fraction]
        for r, order in enumerate(runs):
            for f, fraction in enumerate(fractions):
                count = round(fraction * total)
                if count == 0 and 0 in cache:
                    values[r, f] = cache[0]
                else:
                    heads = select(order, count, info.n_layers, info.n_heads, allow_empty_layers)
                    values[r, f] = ablated_perplexity(loaded, heads, data)
                    if count == 0:
                        cache[0] = values[r, f]
                done += 1
                if progress:
                    progress(done, steps)
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
    }


def plot_curve(result: dict[str, object], path: Path) -> Path:
    """Draw perplexity against the fraction of heads removed (mean, min–max band over runs) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = np.asarray(result["fractions"], dtype=float)
    curves = result["curves"]
    if not isinstance(curves, dict):
        raise TypeError("result has no curves")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
