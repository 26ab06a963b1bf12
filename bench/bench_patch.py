"""Exact activation patching: the naive loop against batched rows with a shared prefix, and the
attribution estimate, on one model and task, all in one run.

- ``naive``: one head per forward pass (all pairs in the batch), the whole corrupted prompt each
  time — what a hand-written patching loop does (``rows_per_pass=1``, ``share_prefix=False``).
- ``batched``: many (pair, head) patches per pass (``--rows-per-pass``), the corrupted prefix run
  once and its KV cache shared, so each patch is a one-token forward.
- ``attribution``: one clean forward, one corrupted forward and one backward for every head.

Prints wall seconds, the speedups, the largest difference between naive and batched effects, and
the Spearman correlation of attribution with the exact effects. Usage::

    .venv/bin/python bench/bench_patch.py --model default --task ioi --n 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchlib import cpu_model, quiet, usable_cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--rows-per-pass", type=int, default=64)
    parser.add_argument("--skip-naive", action="store_true", help="do not run the naive loop (slow)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    quiet()
    import headatlas as ha
    from headatlas.apps.common.patch_tasks import build_task
    from headatlas.apps.patch.patching import (
        activation_patching,
        attribution_patching,
        clean_outputs,
        encode_task,
    )

    loaded = ha.load(args.model)
    task = build_task(loaded.tokenizer, args.task, args.n)
    enc = encode_task(loaded, task, "last")
    source, _ = clean_outputs(loaded, enc.clean, "last")
    if task.source == "mean":
        source = {layer: z.mean(0, keepdim=True).expand_as(z) for layer, z in source.items()}
    result: dict[str, object] = {
        "model": loaded.info.name,
        "task": task.name,
        "pairs": len(enc.clean),
        "heads": loaded.info.n_layers * loaded.info.n_heads,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "threads": torch.get_num_threads(),
    }
    timings: dict[str, float] = {}

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        value = fn()
        timings[name] = time.perf_counter() - start
        return value

    batched = timed(
        "batched",
        lambda: activation_patching(loaded, enc, source, task.metric, rows_per_pass=args.rows_per_pass),
    )
    attribution = timed("attribution", lambda: attribution_patching(loaded, enc, source, task.metric))
    if not args.skip_naive:
        naive = timed(
            "naive",
            lambda: activation_patching(
                loaded, enc, source, task.metric, rows_per_pass=1, share_prefix=False
            ),
        )
        result["max_abs_naive_minus_batched"] = float((naive - batched).abs().max())
        result["speedup_batched_vs_naive"] = timings["naive"] / timings["batched"]
        result["speedup_attribution_vs_naive"] = timings["naive"] / timings["attribution"]
    result["speedup_attribution_vs_batched"] = timings["batched"] / timings["attribution"]
    exact = (batched.mean(0)).flatten()
    estimate = (attribution.mean(0)).flatten()
    ranks = exact.argsort().argsort().float(), estimate.argsort().argsort().float()
    result["spearman_attribution_vs_exact"] = float(torch.corrcoef(torch.stack(ranks))[0, 1])
    result["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
