"""All-head probing: headatlas' batched trainer against a per-head scikit-learn loop, same features.

Collects every head's output on a probing task once (``headatlas.apps.probe.probing.features``), then
fits the L2-regularised multinomial logistic regression of every head two ways at one strength:

- ``batched``: all layers × heads at once (:func:`headatlas.apps.common.logreg.fit_logreg`, L-BFGS);
- ``sklearn``: ``LogisticRegression(C=1 / (l2 · n))`` (the same objective), one head at a time.

Prints both wall times, the speed ratio, and how well the test accuracies agree (largest and mean
absolute difference, Spearman of the head rankings, the top head of each). Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_probe.py --model default --task upos --n-sentences 60
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

from benchlib import cpu_model, quiet, usable_cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", default="upos")
    parser.add_argument("--n-sentences", type=int, default=60)
    parser.add_argument("--l2", type=float, default=1e-2, help="shared L2 strength (mean-CE units)")
    parser.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations of the batched fit")
    args = parser.parse_args()
    quiet()
    from sklearn.linear_model import LogisticRegression

    import headatlas as ha
    from headatlas.apps.common.logreg import fit_logreg
    from headatlas.apps.common.probe_tasks import build_probe_task
    from headatlas.apps.probe.probing import _label_ids, features

    loaded = ha.load(args.model)
    task = build_probe_task(loaded.tokenizer, args.task, args.n_sentences, 0)
    start = time.perf_counter()
    feats = features(loaded, task)
    collect_s = time.perf_counter() - start
    y_train = _label_ids(task.labels("train"), task.classes)
    y_test = _label_ids(task.labels("test"), task.classes)
    n_classes = len(task.classes)
    groups, n, d = feats.train.shape

    start = time.perf_counter()
    fit = fit_logreg(feats.train, y_train, n_classes, args.l2, args.max_iter)
    batched_s = time.perf_counter() - start
    ours = fit.accuracy(feats.test, y_test).numpy()

    start = time.perf_counter()
    theirs = np.empty(groups)
    for g in range(groups):
        model = LogisticRegression(C=1.0 / (args.l2 * n), max_iter=1000)
        model.fit(feats.train[g].numpy(), y_train.numpy())
        theirs[g] = model.score(feats.test[g].numpy(), y_test.numpy())
    sklearn_s = time.perf_counter() - start

    diff = np.abs(ours - theirs)
    spearman = float(pd.Series(ours).rank().corr(pd.Series(theirs).rank()))
    n_heads = loaded.info.n_heads
    result = {
        "model": loaded.info.name,
        "task": task.name,
        "heads": groups,
        "classes": n_classes,
        "train_tokens": n,
        "test_tokens": int(y_test.numel()),
        "d_head": d,
        "l2": args.l2,
        "collect_seconds": round(collect_s, 2),
        "batched_seconds": round(batched_s, 2),
        "sklearn_loop_seconds": round(sklearn_s, 2),
        "speedup": round(sklearn_s / batched_s, 2),
        "max_abs_accuracy_diff": round(float(diff.max()), 4),
        "mean_abs_accuracy_diff": round(float(diff.mean()), 4),
        "heads_within_1_point": int((diff <= 0.01).sum()),
        "spearman_of_head_accuracies": round(spearman, 4),
        "top_head_batched": f"L{int(ours.argmax()) // n_heads}H{int(ours.argmax()) % n_heads} ({ours.max():.3f})",
        "top_head_sklearn": f"L{int(theirs.argmax()) // n_heads}H{int(theirs.argmax()) % n_heads} ({theirs.max():.3f})",
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cores": usable_cores(),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
