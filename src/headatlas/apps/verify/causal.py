"""Causal confirmation of a score: does the task break when the heads it ranks highest are silenced?

A head score is a correlation. ``headatlas verify DIR --score S --k K`` re-runs the task metric of
the battery behind ``S`` three ways — nothing ablated, the top-``k`` heads by ``S`` ablated, and
``k`` random heads ablated (several seeds; mean ± std) — the comparison Wu et al. 2024 use for
retrieval heads ("masking the top-K retrieval heads breaks needle retrieval; masking random heads
does not"). Heads are silenced with :func:`headatlas.ablate`: zero ablation, or mean ablation with
each head's mean output over held-out EWT text (:func:`head_means`). Random heads are drawn uniformly from all heads of the model, the top-``k`` included.

| score                        | metric                                  | better |
|------------------------------|-----------------------------------------|--------|
| ``retrieval``/``retrieval_tf`` | needle retrieval accuracy (``needle``)    | higher |
| ``induction``                | loss on the repeated half of ``[x; x]`` | lower  |
| ``successor``                | next-item accuracy (``ordinal``)        | higher |
| ``translation``              | translation accuracy (``translate``)    | higher |
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...atlas.table import Atlas
from ...batteries.base import make_batch, pad_id
from ...batteries.repeat import repeat_battery
from ...capture import ablate, check_mode, head_outputs
from ...core.errors import HeadatlasError, check_at_least, param
from ...core.heads import head_name
from ...core.progress import Progress, no_progress
from ...core.scores import SCORES
from ...core.storage import write_json
from ...functional import FUNCTIONAL_BATTERIES, FunctionalConfig, battery_spec
from ...model.info import LoadedModel

if TYPE_CHECKING:
    from ...scanning.parallel import WorkerPool

INDUCTION_PROMPTS = 16
INDUCTION_SEQ_LEN = 129


@dataclass(frozen=True)
class Verification:
    """The result of :func:`verify`, written to ``DIR/verify-<score>.json``."""

    score: str
    k: int
    metric: str
    higher_is_better: bool
    baseline: float
    top_k: float
    random_mean: float
    random_std: float
    random_seeds: list[int]
    random_values: list[float]
    top_heads: list[str]
    random_heads: list[list[str]]
    mode: str
    seconds: float

    def to_dict(self) -> dict[str, object]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


def induction_loss(loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress) -> float:
    """Return the mean next-token loss on the second copy of ``[BOS, x, x]`` (random tokens).

    The task induction heads do (Olsson et al. 2022): after one copy, the second is predictable.
    Uses the ``repeat`` battery's tokens (:func:`headatlas.batteries.repeat.repeat_battery`), seeded.
    """
    if not loaded.info.causal:
        raise HeadatlasError("induction loss needs a decoder (causal) language model")
    vocab = int(loaded.model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
    n = config.n_prompts or INDUCTION_PROMPTS
    seq_len = min(INDUCTION_SEQ_LEN, loaded.info.context_length or INDUCTION_SEQ_LEN)
    battery = repeat_battery(loaded.tokenizer, vocab, n, seq_len, config.seed)
    period, start = battery.period or 0, battery.repeat_start
    device = loaded.device
    pad = pad_id(loaded.tokenizer)
    chunks = [battery.sequences[i : i + config.batch_size] for i in range(0, n, config.batch_size)]
    total, count = 0.0, 0
    with torch.no_grad():
        for index, chunk in enumerate(chunks):
            batch = make_batch(chunk, pad)  # all sequences have the same length: no padding
            ids = batch.input_ids.to(device)  # [batch, seq]
            logits = loaded.model(input_ids=ids, attention_mask=batch.attention_mask.to(device)).logits
            # position p predicts token p + 1; score predictions of the second copy's tokens 2..P
            first = start + period + 1
            pred = logits[:, first - 1 : start + 2 * period - 1].float()  # [batch, P-1, vocab]
            target = ids[:, first : start + 2 * period]  # [batch, P-1]
            loss = torch.nn.functional.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="sum")
            total += float(loss)
            count += target.numel()
            progress(index + 1, len(chunks))
    return total / count


Metric = Callable[[LoadedModel, FunctionalConfig, Progress], float]


def _patch_metric(score: str, atlas: Atlas | None) -> tuple[Metric, str, bool] | None:
    """The metric of a ``patch_<task>`` score: the task's metric on held-out pairs (built-in tasks
    drawn again with another seed; a pair file's own pairs), or ``None`` if ``score`` is not one."""
    runs = (atlas.meta.get("patch", {}) if atlas is not None else {}) or {}
    found = next(((name, p) for name, p in runs.items() if score in p.get("columns", [])), None)
    if found is None:
        return None
    name, params = found
    builtin = name == "ioi" or name.startswith("fv:")

    def held_out(loaded: LoadedModel, config: FunctionalConfig, progress: Progress) -> float:
        from ..common.patch_tasks import build_task, task_metric

        n = config.n_prompts or int(params.get("n", 24))
        task = build_task(
            loaded.tokenizer, name if builtin else str(params["task"]), n, int(params.get("seed", 0)) + 1
        )
        value = task_metric(loaded, task)
        progress(1, 1)
        return value

    what = "answer probability" if params.get("metric") == "prob" else "logit difference answer − wrong"
    return held_out, f"{what} on {'held-out' if builtin else 'the file'}'s pairs", True


def metric_for(score: str, atlas: Atlas | None = None) -> tuple[Metric, str, bool]:
    """Return ``(metric, what it measures, higher_is_better)`` for an atlas score; raise if it has none.

    The metric belongs to the battery that writes the score (:attr:`ScoreSpec.battery
    <headatlas.core.scores.ScoreSpec.battery>`): the repeat battery's is :func:`induction_loss`, a
    functional battery's its :attr:`~headatlas.functional.BatterySpec.metric`, and a
    ``patch_<task>`` score's (recorded in ``atlas``) the task's metric on held-out pairs, and an
    imported column's (``headatlas import --like``) the metric of the score it is like.
    """
    patched = _patch_metric(score, atlas)
    if patched is not None:
        return patched
    imported = (atlas.meta.get("imported", {}) if atlas is not None else {}).get(score)
    if imported and imported.get("like"):  # a foreign annotation, measured by the task of its kind
        return metric_for(str(imported["like"]), atlas)
    battery = SCORES[score].battery if score in SCORES else None
    if battery == "repeat":
        return induction_loss, "loss on the repeated half", False
    spec = battery_spec(battery) if battery in FUNCTIONAL_BATTERIES else None
    if spec is None or spec.metric is None:
        raise HeadatlasError(
            f"no task metric for score {score!r}: verify takes retrieval, retrieval_tf, induction, "
            "successor, successor_logit, translation or a patch_<task> score"
        )
    return spec.metric, spec.metric_name, spec.higher_is_better


MEAN_SEQS = 8
MEAN_SEQ_LEN = 128


def head_means(loaded: LoadedModel, seed: int = 0) -> dict[tuple[int, int], torch.Tensor]:
    """Return each head's mean output ``{(layer, head): [d_head]}`` over held-out text.

    Mean ablation replaces a head's output by this mean (Wang et al. 2022). Computing it once, on
    UD English EWT dev (8 × 128 tokens), keeps it the same for every metric — decoding steps see one
    position at a time, where a per-forward mean would change nothing.
    """
    from ...batteries.natural import natural_battery
    from ...data.ud import ewt_sentences

    info = loaded.info
    seq_len = min(MEAN_SEQ_LEN, info.context_length or MEAN_SEQ_LEN)
    battery = natural_battery(
        loaded.tokenizer, ewt_sentences("dev"), MEAN_SEQS, seq_len, seed, "UD English EWT dev"
    )
    batch = make_batch(battery.sequences, pad_id(loaded.tokenizer))
    sums: dict[int, torch.Tensor] = {}

    def keep_mean(layer: int, z: torch.Tensor, _context: object) -> None:
        sums[layer] = z.float().mean(dim=(0, 1))  # [head, d_head]

    with head_outputs(loaded, keep_mean), torch.no_grad():
        loaded.model(
            input_ids=batch.input_ids.to(loaded.device),
            attention_mask=batch.attention_mask.to(loaded.device),
        )
    return {(layer, head): sums[layer][head] for layer in sums for head in range(info.n_heads)}


def check_verifiable(atlas: Atlas, score: str) -> None:
    """Raise :class:`HeadatlasError` unless the score has a task metric and ``atlas`` holds it."""
    metric_for(score, atlas)
    if score not in atlas.scores:
        raise HeadatlasError(f"no score {score!r} in this atlas: scan with the battery that writes it first")


@dataclass(frozen=True)
class _Ablated:
    """One run of the metric with ``heads`` ablated (a Ray shard, or one step of the loop)."""

    label: str
    heads: list[tuple[int, int]]
    metric: Any
    metric_name: str
    mode: str
    means: dict[tuple[int, int], torch.Tensor] | None
    config: FunctionalConfig


def _ablated_metric(
    loaded: LoadedModel, run: _Ablated, progress: Callable[[str, int, int], None] | None = None
) -> tuple[str, float]:
    def step(done: int, total: int) -> None:
        if progress is not None:
            progress(run.label, done, total)

    with ablate(loaded, run.heads, mode=run.mode, means=run.means):
        value = float(run.metric(loaded, run.config, step))
    if not math.isfinite(value):
        raise HeadatlasError(f"the {run.metric_name} came out as {value} ({run.label}): nothing to compare")
    return run.label, value


def _ablated_shard(loaded: LoadedModel, run: _Ablated) -> tuple[str, float]:
    return _ablated_metric(loaded, run)


def verify(
    loaded: LoadedModel,
    atlas: Atlas,
    score: str,
    k: int = 10,
    seeds: int = 5,
    mode: str = "zero",
    config: FunctionalConfig | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    pool: WorkerPool | None = None,
) -> Verification:
    """Return the task metric with nothing, the top-``k`` heads by ``score`` and ``k`` random heads
    (``seeds`` draws) ablated — Wu et al. 2024's causal check, for any score with a task metric.

    With ``pool`` the ``seeds + 2`` runs go to its Ray workers in parallel.
    """
    config = config or FunctionalConfig()
    check_mode(mode)
    check_verifiable(atlas, score)
    metric, metric_name, higher = metric_for(score, atlas)
    info = loaded.info
    n_total = info.n_layers * info.n_heads
    if not 1 <= k < n_total:
        raise HeadatlasError(f"{param('k')} {k}: give a number of heads from 1 to {n_total - 1}")
    check_at_least("seeds", seeds, 1)
    top = atlas.top(score, k)
    if top[score].isna().any():
        raise HeadatlasError(f"the atlas has no {score!r} value for some of the top {k} heads: rescan")
    top_heads = [(int(layer), int(head)) for layer, head in zip(top["layer"], top["head"], strict=True)]
    started = time.perf_counter()
    means = head_means(loaded, config.seed) if mode == "mean" else None
    random_heads: list[list[tuple[int, int]]] = []
    for seed in range(seeds):
        picks = np.random.default_rng(seed).choice(n_total, size=k, replace=False)
        random_heads.append([(int(p) // info.n_heads, int(p) % info.n_heads) for p in picks])
    labels = ["nothing ablated", f"top {k} ablated", *(f"random {k} (seed {s})" for s in range(seeds))]
    runs = [
        _Ablated(label, heads, metric, metric_name, mode, means, config)
        for label, heads in zip(labels, [[], top_heads, *random_heads], strict=True)
    ]
    if pool is None:
        values = dict(_ablated_metric(loaded, run, progress) for run in runs)
    else:
        values = {}
        for done, (label, value) in enumerate(pool.map_unordered(_ablated_shard, runs), start=1):
            values[label] = value
            if progress is not None:
                progress("ablation runs", done, len(runs))
    randoms = [values[label] for label in labels[2:]]
    return Verification(
        score=score,
        k=k,
        metric=metric_name,
        higher_is_better=higher,
        baseline=values[labels[0]],
        top_k=values[labels[1]],
        random_mean=float(np.mean(randoms)),
        random_std=float(np.std(randoms)),
        random_seeds=list(range(seeds)),
        random_values=randoms,
        top_heads=[head_name(*h) for h in top_heads],
        random_heads=[[head_name(*h) for h in heads] for heads in random_heads],
        mode=mode,
        seconds=round(time.perf_counter() - started, 2),
    )


def save_verification(result: Verification, directory: str | Path) -> Path:
    """Write ``DIR/verify-<score>.json`` atomically and return its path."""
    return write_json(Path(directory) / f"verify-{result.score}.json", result.to_dict(), indent=2)
