"""Inference-time intervention on TruthfulQA, cross-validated over questions the way Li et al.
2023's code validates it (``validate_2fold.py`` of github.com/likenneth/honest_llama).

For each seed the questions are cut into ``n_folds`` folds; each fold in turn is the test half
and the rest the training half, of which a ``val_share`` of the questions is the validation
split. On the training part every head gets a logistic probe on its output at the last token of
question + answer (true and false answers; here read during the unsteered scoring pass, with the
primer), heads are ranked by the probes' validation accuracy (:func:`.steering.rank_heads`), and
each gets the mass-mean direction and σ over the whole training half. Every (α, K) of the grid is
scored on the validation questions. The best steered configuration (α > 0) by mean MC2 is then
scored on the test half, as ITI reports it: ITI at that (α, K), and K random heads (their own
mass-mean directions and σ) at the same α. Validation's own choice, where α = 0 (no steering) may
win, is reported beside them (``validated``: the baseline's scores where α = 0 won). The shift acts on
the answer tokens (:mod:`.mc`) for MC, on every token for the CE / KL cost on EWT text
(:func:`.evaluation.text_costs`). Confidence intervals: 95 % bootstrap over questions of the
per-question scores (averaged over the seeds that tested the question).

``rotate=True`` scores each question under ITI and the control in one seed only (a fixed seeded
assignment, always from a split that held it out): the cost of one seed, questions from all.
``checkpoint`` keeps every finished stage (the baseline pass, each split) so a run can resume.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ...core.errors import HeadatlasError, check_at_least, param
from ...core.outputs import Folder
from ...core.storage import atomic_path
from ...model.identity import weights_record
from ...model.info import LoadedModel
from ..common.truthfulqa import question_folds, read_truthfulqa
from .evaluation import check_sweep, text_costs
from .mc import ChoiceQuestion, choice_logprobs, encode_choices, mc_metrics
from .steering import HeadRanking, HeadShift, rank_heads

FOLDER = Folder("steer truthfulqa", "truthfulqa.json")
"""The output folder of ``headatlas steer truthfulqa``: its marker is the results JSON."""
ALPHAS = (0.0, 5.0, 10.0, 15.0)
KS = (8, 16, 32)
KINDS = ("baseline", "iti", "random", "validated")
"""``iti`` and ``random``: the best steered (α > 0) configuration on the validation questions, as
ITI reports it; ``validated``: validation's own choice, which is the baseline where α = 0 won."""
StageProgress = Callable[[str, int, int], None]
"""``(label, done, total)``: one label per stage (the CLI shows one bar each)."""


@dataclass
class TruthfulQAResult:
    """``summary``: JSON-ready settings, MC1 / MC2 with 95 % intervals per kind, cost, every split;
    ``per_question``: one row per (kind, seed, question) with ``mc1``, ``mc2``."""

    summary: dict[str, Any]
    per_question: pd.DataFrame


class _Stages:
    """Finished stages kept as ``<name>-<key>.pt`` in a directory (none when it is ``None``)."""

    def __init__(self, directory: str | Path | None, key: str) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.key = key

    def has(self, name: str) -> bool:
        return self.directory is not None and (self.directory / f"{name}-{self.key}.pt").is_file()

    def get(self, name: str, make: Callable[[], Any]) -> Any:
        if self.directory is None:
            return make()
        path = self.directory / f"{name}-{self.key}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)  # tensors and plain containers: no pickle code runs
        value = make()
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(value, tmp)
        return value


def _score(
    loaded: LoadedModel,
    encoded: Sequence[ChoiceQuestion],
    picked: np.ndarray,
    shift: HeadShift | None,
    alpha: float,
    tick: Callable[[int, int], None],
    batch_tokens: int,
) -> np.ndarray:
    """Return MC1, MC2 ``[question, 2]`` of questions ``picked`` with ``shift`` at ``alpha``."""
    chosen = [encoded[int(i)] for i in picked]
    scores, _ = choice_logprobs(loaded, chosen, shift, alpha, batch_tokens=batch_tokens, progress=tick)
    return np.array([mc_metrics(s, q.n_true, q.best) for s, q in zip(scores, chosen, strict=True)]).reshape(
        -1, 2
    )


@dataclass
class _Run:
    """What every split of a run shares."""

    loaded: LoadedModel
    encoded: list[ChoiceQuestion]
    features: torch.Tensor  # [group, answer, d_head]
    labels: torch.Tensor  # [answer]
    rows: list[torch.Tensor]  # answer indices of each question
    baseline: np.ndarray  # [question, 2]
    alphas: list[float]
    ks: list[int]
    val_share: float
    n_text: int
    batch_tokens: int
    progress: StageProgress

    def answers(self, questions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.cat([self.rows[int(q)] for q in questions])  # [answer]
        return self.features[:, index], self.labels[index]

    def tick(self, label: str) -> Callable[[int, int], None]:
        return lambda done, total: self.progress(label, done, total)


def _grid(run: _Run, ranking: HeadRanking, val: np.ndarray, label: str) -> list[dict[str, float]]:
    """Score every (α, K) on the validation questions; α = 0 is the baseline."""
    grid = []
    configs = [(a, k) for k in run.ks for a in run.alphas]
    for done, (alpha, k) in enumerate(configs):
        if alpha == 0:
            mc = run.baseline[val]
        else:
            mc = _score(
                run.loaded, run.encoded, val, ranking.top(k), alpha, lambda *_: None, run.batch_tokens
            )
        grid.append({"alpha": alpha, "k": k, "mc1": float(mc[:, 0].mean()), "mc2": float(mc[:, 1].mean())})
        run.progress(label, done + 1, len(configs))
    return grid


def _split(run: _Run, seed: int, fold: int, folds: list[np.ndarray], tested: np.ndarray) -> dict[str, Any]:
    """Fit on the training half of one split, choose (α, K) on its validation questions, score the test half."""
    start = time.perf_counter()
    test = folds[fold]
    half = np.sort(np.concatenate([f for i, f in enumerate(folds) if i != fold]))
    rng = np.random.default_rng([seed, fold])
    val = np.sort(rng.choice(half, size=max(1, round(len(half) * run.val_share)), replace=False))
    train = np.setdiff1d(half, val)
    ranking = rank_heads(
        run.answers(train), run.answers(val), run.loaded.info.n_heads, pool=run.answers(half)
    )
    label = f"seed {seed} fold {fold}"
    grid = _grid(run, ranking, val, f"{label}: α × K on {len(val)} validation questions")
    best = max(grid, key=lambda g: g["mc2"])  # validation's choice: α = 0 (no steering) may win
    steer = max((g for g in grid if g["alpha"] != 0), key=lambda g: g["mc2"], default=best)
    alpha, k = steer["alpha"], int(steer["k"])
    random_shift = ranking.shift(torch.as_tensor(rng.choice(ranking.val.numel(), size=k, replace=False)))
    shifts = {"iti": ranking.top(k), "random": random_shift}
    scored = {}
    for kind, shift in shifts.items():
        if alpha == 0:
            scored[kind] = run.baseline[tested]
        else:
            scored[kind] = _score(
                run.loaded,
                run.encoded,
                tested,
                shift,
                alpha,
                run.tick(f"{label}: test, {kind}"),
                run.batch_tokens,
            )
    costs, tokens = text_costs(
        run.loaded, {kind: (shift, alpha) for kind, shift in shifts.items()}, run.n_text
    )
    return {
        "seed": seed, "fold": fold, "n_train": len(train), "n_val": len(val), "n_test": len(test),
        "tested": tested.tolist(), "val_grid": grid, "chosen": {"alpha": best["alpha"], "k": int(best["k"])},
        "steered": {"alpha": alpha, "k": k},
        "heads": [f"L{layer}H{head}" for layer, head in shifts["iti"].heads],
        "val_accuracy": [round(float(v), 4) for v in ranking.val[ranking.order[:k]]],
        "random_heads": [f"L{layer}H{head}" for layer, head in random_shift.heads],
        "scores": {kind: scored[kind].tolist() for kind in shifts},
        "cost": {"ce_base": costs[None][0], "n_tokens": tokens, **{f"{kind}_{m}": costs[kind][i] for kind in shifts for i, m in enumerate(("ce", "kl"))}},
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def bootstrap(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Return the mean of ``values [question]`` and its 95 % bootstrap interval over questions."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)  # [n_boot]
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "mean": round(float(values.mean()), 4),
        "low": round(float(low), 4),
        "high": round(float(high), 4),
    }


def _frame(baseline: np.ndarray, splits: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        {"kind": "baseline", "seed": -1, "fold": -1, "question": q, "mc1": m[0], "mc2": m[1]}
        for q, m in enumerate(baseline.tolist())
    ]
    for split in splits:
        unsteered = baseline[split["tested"]].tolist()
        validated = split["scores"]["iti"] if split["chosen"]["alpha"] != 0 else unsteered
        for kind, scores in (*split["scores"].items(), ("validated", validated)):
            for q, m in zip(split["tested"], scores, strict=True):
                rows.append(
                    {
                        "kind": kind,
                        "seed": split["seed"],
                        "fold": split["fold"],
                        "question": q,
                        "mc1": m[0],
                        "mc2": m[1],
                    }
                )
    return pd.DataFrame(rows)


def _summarise(frame: pd.DataFrame, splits: list[dict[str, Any]]) -> dict[str, Any]:
    """MC1 / MC2 per kind and the paired differences, each with a 95 % bootstrap interval."""
    means = {kind: frame[frame["kind"] == kind].groupby("question")[["mc1", "mc2"]].mean() for kind in KINDS}
    tested = means["iti"].index
    out: dict[str, Any] = {}
    for kind in KINDS:
        part = means[kind].loc[tested]
        out[kind] = {m: bootstrap(part[m].to_numpy()) for m in ("mc1", "mc2")}
    for a, b in (("iti", "baseline"), ("iti", "random"), ("random", "baseline"), ("validated", "baseline")):
        diff = means[a].loc[tested] - means[b].loc[tested]
        out[f"{a}_minus_{b}"] = {m: bootstrap(diff[m].to_numpy()) for m in ("mc1", "mc2")}
    out["n_questions"] = len(tested)
    costs = [_validated_cost(s["cost"], s["chosen"]["alpha"] != 0) for s in splits]
    out["cost"] = {
        key: round(float(np.mean([c[key] for c in costs])), 5)
        for key in ("ce_base", "iti_ce", "iti_kl", "random_ce", "random_kl", "validated_ce", "validated_kl")
    }
    out["chosen"] = [dict(s["chosen"], seed=s["seed"], fold=s["fold"]) for s in splits]
    out["steered"] = [dict(s["steered"], seed=s["seed"], fold=s["fold"]) for s in splits]
    return out


def _validated_cost(cost: dict[str, float], steered: bool) -> dict[str, float]:
    """A split's cost with validation's choice added: ITI's when it steers, none otherwise."""
    return {
        **cost,
        "validated_ce": cost["iti_ce"] if steered else cost["ce_base"],
        "validated_kl": cost["iti_kl"] if steered else 0.0,
    }


def _check(
    loaded: LoadedModel,
    alphas: Sequence[float],
    ks: Sequence[int],
    n_folds: int,
    seeds: int,
    val_share: float,
    n_text: int,
) -> list[float]:
    values = check_sweep(loaded, alphas, n_text)
    if not list(ks):
        raise HeadatlasError(f"{param('ks')} is empty: give at least one number of heads, e.g. 16")
    total = loaded.info.n_layers * loaded.info.n_heads
    for k in ks:
        check_at_least("ks", k, 1)
        if k > total:
            raise HeadatlasError(f"{param('ks')} {k} is larger than the model's {total} heads")
    check_at_least("n_folds", n_folds, 2)
    check_at_least("seeds", seeds, 1)
    if not 0 < val_share < 1:
        raise HeadatlasError(f"{param('val_share')} must be between 0 and 1, got {val_share}")
    return values


def _check_splits(
    splits: Sequence[tuple[int, int]] | None, seeds: int, n_folds: int
) -> set[tuple[int, int]] | None:
    if splits is None:
        return None
    for seed, fold in splits:
        if not (0 <= seed < seeds and 0 <= fold < n_folds):
            raise HeadatlasError(
                f"{param('splits')} {seed}-{fold} is outside the run: seeds 0..{seeds - 1}, folds 0..{n_folds - 1}"
            )
    return {(int(seed), int(fold)) for seed, fold in splits}


def _keys(loaded: LoadedModel, csv: Path, settings: dict[str, Any]) -> tuple[str, str]:
    """Return the checkpoint keys of the unsteered pass (the weights and the CSV: runs with other
    settings reuse it) and of the splits (the settings too); the weights are hashed once."""
    record = weights_record(loaded)
    parts = [
        record.get("params_sha256") or record["model_sha256"],
        hashlib.sha256(csv.read_bytes()).hexdigest(),
    ]
    pass_key, split_key = (
        hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        for key in (parts, [*parts, settings])
    )
    return pass_key, split_key


def parse_splits(text: str) -> list[tuple[int, int]]:
    """Return the ``(seed, fold)`` pairs of ``"0-0,1-1"``; a one-line error on anything else."""
    pairs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        seed, _, fold = item.partition("-")
        if not (seed.isdigit() and fold.isdigit()):
            raise HeadatlasError(f"{param('splits')} takes SEED-FOLD pairs such as 0-0,0-1; got {item!r}")
        pairs.append((int(seed), int(fold)))
    if not pairs:
        raise HeadatlasError(f"{param('splits')} is empty: give SEED-FOLD pairs such as 0-0,0-1")
    return pairs


def truthfulqa(
    loaded: LoadedModel,
    csv: str | Path,
    alphas: Sequence[float] = ALPHAS,
    ks: Sequence[int] = KS,
    n_folds: int = 2,
    seeds: int = 3,
    val_share: float = 0.2,
    n_text: int = 32,
    rotate: bool = False,
    checkpoint: str | Path | None = None,
    batch_tokens: int = 256,
    progress: StageProgress | None = None,
    splits: Sequence[tuple[int, int]] | None = None,
) -> TruthfulQAResult:
    """Run ITI on TruthfulQA (Lin et al. 2022) as Li et al. 2023 validate it: ``seeds`` random
    ``n_folds``-fold splits over questions; per split probes, head ranking and mass-mean directions
    on the training half, the best steered (α > 0) (α, K) from ``alphas`` × ``ks`` on its
    validation questions by MC2, then baseline, ITI and K random heads at it scored (MC1, MC2) on
    the held-out half beside validation's own choice (α = 0 allowed), with the CE / KL cost on
    ``n_text`` EWT sentences — ``ha.steer.truthfulqa``.

    ``splits`` (``(seed, fold)`` pairs) computes only those splits and takes the others from
    ``checkpoint`` where finished there (left out otherwise): processes given disjoint splits and
    one ``checkpoint`` share the work, and a last call without ``splits`` gathers every split."""
    values = _check(loaded, alphas, ks, n_folds, seeds, val_share, n_text)
    wanted = _check_splits(splits, seeds, n_folds)
    questions = read_truthfulqa(csv)
    if len(questions) < 2 * n_folds:
        raise HeadatlasError(
            f"{param('csv')} {csv} has {len(questions)} questions: {n_folds} folds need {2 * n_folds} at least"
        )
    tell = progress or (lambda *_: None)
    settings = {
        "alphas": values,
        "ks": [int(k) for k in ks],
        "n_folds": n_folds,
        "val_share": val_share,
        "n_text": n_text,
        "rotate": rotate,
        "seeds": seeds,
        "steered": "best α > 0 on validation",
    }
    pass_key, split_key = _keys(loaded, Path(csv), settings) if checkpoint is not None else ("", "")
    stages, passes = _Stages(checkpoint, split_key), _Stages(checkpoint, pass_key)
    start = time.perf_counter()
    encoded = encode_choices(loaded, questions)
    label = f"baseline: {len(questions)} questions"
    scores, features = passes.get(
        "baseline",
        lambda: choice_logprobs(
            loaded, encoded, features=True, batch_tokens=batch_tokens, progress=lambda d, t: tell(label, d, t)
        ),
    )
    baseline_s = time.perf_counter() - start
    sizes = [len(q.rests) for q in encoded]
    bounds = np.cumsum([0, *sizes])
    run = _Run(
        loaded, encoded, features, torch.tensor([int(x) for q in questions for x in q.labels]),
        [torch.arange(int(bounds[i]), int(bounds[i + 1])) for i in range(len(sizes))],
        np.array([mc_metrics(s, q.n_true, q.best) for s, q in zip(scores, encoded, strict=True)]),
        values, [int(k) for k in ks], val_share, n_text, batch_tokens, tell,
    )  # fmt: skip
    owner = np.random.default_rng(len(questions)).permutation(len(questions)) % seeds
    done: list[dict[str, Any]] = []
    for seed in range(seeds):
        folds = question_folds(len(questions), n_folds, seed)
        for fold in range(n_folds):
            tested = folds[fold][owner[folds[fold]] == seed] if rotate else folds[fold]
            name = f"split-{seed}-{fold}"
            if wanted is None or (seed, fold) in wanted:
                done.append(stages.get(name, partial(_split, run, seed, fold, folds, tested)))
            elif stages.has(name):
                done.append(stages.get(name, lambda: None))
    frame = _frame(run.baseline, done)
    summary = {
        "paper": "Li et al. 2023 (ITI), on TruthfulQA (Lin et al. 2022)",
        "model": loaded.info.name,
        "csv": {
            "path": str(csv),
            "sha256": hashlib.sha256(Path(csv).read_bytes()).hexdigest(),
            "questions": len(questions),
        },
        "settings": {
            **settings,
            "splits": [f"{split['seed']}-{split['fold']}" for split in done],
            "direction": "mass-mean",
            "select": "max validation MC2 (iti, random: over α > 0; validated: α = 0 included)",
            "shift_at": "answer tokens (MC), every token (CE / KL)",
        },
        **_summarise(frame, done),
        "splits": done,
        "seconds": {"baseline": round(baseline_s, 1), "total": round(time.perf_counter() - start, 1)},
    }
    return TruthfulQAResult(summary, frame)


LABELS = {
    "baseline": "baseline",
    "iti": "ITI (top-K probe heads)",
    "random": "K random heads",
    "validated": "validation's choice (α = 0 allowed)",
}


def summary_table(summary: dict[str, Any]) -> pd.DataFrame:
    """Return one row per kind: MC1 and MC2 with their 95 % intervals, CE and KL (nats / token)."""
    cost = summary["cost"]
    rows = []
    for kind in KINDS:
        row: dict[str, Any] = {"heads": LABELS[kind]}
        for metric in ("mc1", "mc2"):
            value = summary[kind][metric]
            row[metric] = value["mean"]
            row[f"{metric}_ci"] = f"[{value['low']:.3f}, {value['high']:.3f}]"
        row["ce"] = cost["ce_base"] if kind == "baseline" else cost[f"{kind}_ce"]
        row["kl"] = 0.0 if kind == "baseline" else cost[f"{kind}_kl"]
        rows.append(row)
    return pd.DataFrame(rows)


def truthfulqa_figure(summary: dict[str, Any], title: str, out: str | Path) -> Path:
    """Write the figure: validation MC2 against α per K (mean over splits), and test MC1 / MC2 of
    baseline, ITI and random heads with 95 % intervals."""
    from matplotlib.figure import Figure

    from ...report.figures import save_figure

    fig = Figure(figsize=(8.0, 3.2))
    ax = fig.add_subplot(1, 2, 1)
    grid = pd.DataFrame([g for split in summary["splits"] for g in split["val_grid"]])
    for k, part in grid.groupby("k"):
        mean = part.groupby("alpha")["mc2"].mean()
        ax.plot(mean.index, mean.to_numpy(), "-o", label=f"K = {k}")
    ax.set_xlabel("α", fontsize=9)
    ax.set_ylabel("MC2, validation questions", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    for offset, kind in enumerate(KINDS):
        means = [summary[kind][m]["mean"] for m in ("mc1", "mc2")]
        errors = [
            [summary[kind][m]["mean"] - summary[kind][m]["low"] for m in ("mc1", "mc2")],
            [summary[kind][m]["high"] - summary[kind][m]["mean"] for m in ("mc1", "mc2")],
        ]
        ax.bar(np.arange(2) + 0.2 * (offset - 1.5), means, 0.2, yerr=errors, capsize=3, label=LABELS[kind])
    ax.set_xticks([0, 1], ["MC1", "MC2"], fontsize=8)
    ax.set_ylabel(f"held-out questions (n = {summary['n_questions']})", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out)
