"""Ray against in-process: a scan and ablation importance, in one run, on one machine.

- ``scan``: ``headatlas.scan`` of ``--probes`` in-process, then over Ray with 1 worker and with
  ``--workers`` workers (default 2). Each Ray run starts a local Ray, loads the model in its
  actors, scans, and stops Ray; the table shows the whole wall time and the scan alone (the
  atlas's ``wall_seconds``, measured after the workers hold the model), both as ratios to the
  in-process scan. The atlases are compared (largest difference of any score).
- ``importance``: ablation importance (one forward per head) in-process and over ``--workers``
  Ray workers, on the same held-out batches; the pool is started before the clock starts.

Torch threads: in-process uses torch's default (every core); a Ray worker gets cores / workers.
Usage::

    .venv/bin/python bench/bench_ray.py --n-prompts 32 --seq-len 256 --json ray.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchlib import cpu_model, quiet, usable_cores


def _largest_difference(a, b) -> float:  # type: ignore[no-untyped-def]
    import pandas as pd

    numeric = [c for c in a.table.columns if pd.api.types.is_float_dtype(a.table[c]) and c in b.table]
    return float(np.nanmax(np.abs(a.table[numeric].to_numpy() - b.table[numeric].to_numpy())))


def bench_scan(args: argparse.Namespace, result: dict) -> None:  # type: ignore[type-arg]
    import headatlas as ha

    loaded = ha.load(args.model)
    settings = {"probes": args.probes.split(","), "n_prompts": args.n_prompts, "seq_len": args.seq_len}
    ha.scan(loaded, **{**settings, "n_prompts": 2})  # warm-up
    runs: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    base = ha.scan(loaded, **settings)
    runs["in-process"] = {"wall": time.perf_counter() - start, "scan": base.meta["wall_seconds"]}
    for workers in (1, args.workers):
        start = time.perf_counter()
        atlas = ha.scan(args.model, ray="auto", workers=workers, **settings)
        runs[f"ray × {workers}"] = {
            "wall": time.perf_counter() - start,
            "scan": atlas.meta["wall_seconds"],
            "max_diff": _largest_difference(atlas, base),
        }
    result["scan"] = {"settings": settings, "tokens": base.meta["tokens"], "runs": runs}
    ref = runs["in-process"]
    print(f"\nscan of {args.model}: {args.probes}, {base.meta['tokens']:,} tokens")
    print(f"{'run':<12} {'wall s':>8} {'× in-proc':>10} {'scan s':>8} {'× in-proc':>10} {'max |Δ|':>9}")
    for name, run in runs.items():
        diff = f"{run['max_diff']:.1e}" if "max_diff" in run else "-"
        print(
            f"{name:<12} {run['wall']:>8.1f} {run['wall'] / ref['wall']:>10.2f} {run['scan']:>8.1f} "
            f"{run['scan'] / ref['scan']:>10.2f} {diff:>9}"
        )


def bench_importance(args: argparse.Namespace, result: dict) -> None:  # type: ignore[type-arg]
    import headatlas as ha
    from headatlas.apps.common.evaluation import heldout_data
    from headatlas.apps.prune.importance import ablation_importance
    from headatlas.scanning.parallel import worker_pool

    loaded = ha.load(args.model)
    data = heldout_data(
        loaded, "natural", "dev", args.importance_seqs, args.importance_len, args.importance_seqs
    )
    start = time.perf_counter()
    local = ablation_importance(loaded, data)
    local_s = time.perf_counter() - start
    with worker_pool(args.model, "auto", args.workers) as pool:
        start = time.perf_counter()
        sharded = ablation_importance(loaded, data, pool=pool)
        ray_s = time.perf_counter() - start
    diff = float(np.abs(local.scores - sharded.scores).max())
    result["importance"] = {
        "heads": int(local.scores.size),
        "forwards": local.forwards,
        "tokens_per_forward": data.n_tokens,
        "in_process_s": local_s,
        "ray_s": ray_s,
        "workers": args.workers,
        "speedup": local_s / ray_s,
        "max_diff": diff,
    }
    print(f"\nablation importance ({local.forwards} forwards of {data.n_tokens:,} tokens)")
    print(f"in-process {local_s:.1f} s; Ray × {args.workers} {ray_s:.1f} s: {local_s / ray_s:.2f}× ")
    print(f"largest difference of Δloss {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--probes", default="natural,repeat")
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--importance-seqs", type=int, default=4)
    parser.add_argument("--importance-len", type=int, default=128)
    parser.add_argument("--skip-importance", action="store_true")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    quiet()
    result: dict[str, object] = {
        "model": args.model,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "threads": torch.get_num_threads(),
    }
    bench_scan(args, result)
    if not args.skip_importance:
        bench_importance(args, result)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
