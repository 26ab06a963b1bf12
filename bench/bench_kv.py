"""Head-wise KV caches from the atlas against the plain cache, on the same RULER-style prompts, in one run.

Rows (every sample runs through every row):

- ``full``: transformers' ``DynamicCache``, the model's own SDPA attention;
- ``atlas F``: the atlas plan keeping fraction F of the KV bytes at the prompt length, the prompt
  attended in full then compressed (kvpress's way; one full prefill is shared by these rows and
  its time is counted for each, plus the compression);
- ``random F``: the same number of full KV heads drawn at random (seeded), same bytes;
- ``atlas F, streaming prefill``: DuoAttention's way, chunked prefill in which streaming heads
  only ever see sink + window keys (its own prefill, timed on its own);
- ``--moa LABEL=PLAN.json``: ``LABEL F``, a ``kv fit --method moa`` plan's profile solved again for
  fraction F at each length (one window per KV head, MoA); ``--replan LABEL=PLAN.json``: a ``kv fit``
  plan's gates planned again for F at each length (so every row of a length holds the same bytes).

Columns: exact-match accuracy, KV bytes really held after prefill (``cache.nbytes()``: tensors,
not a formula), peak RSS during prefill and during decode (Linux ``VmHWM`` reset before each
phase), prefill seconds, decode ms per generated token, and KV kept relative to ``full``.
Generation stops at EOS, at the task's token limit, or once the answer holds every expected
string (scoring only asks that they occur, so stopping then cannot change a score). Usage::

    .venv/bin/python bench/bench_kv.py --atlas /tmp/kv-atlas --lengths 1024 --n 5

``--export-tasks FILE`` writes the same samples (prompt text, token ids, expected strings) as JSON
for ``bench_kvpress.py`` and stops.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import time
from typing import Any

import torch

from benchlib import cpu_model, current_rss_mib, peak_since_reset_mib, quiet, reset_peak_rss, usable_cores
from headatlas.model.compat import cache_kwargs


class _Answered:
    """Stopping criterion: the decoded new tokens already hold every expected string."""

    def __init__(self, tokenizer: Any, start: int, expected: tuple[str, ...]) -> None:
        self.tokenizer, self.start, self.expected = tokenizer, start, expected

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.start :], skip_special_tokens=True)
        done = all(value in text for value in self.expected)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


def _decode(loaded: Any, ids: torch.Tensor, cache: Any, sample: Any) -> tuple[str, float, int]:
    from transformers import StoppingCriteriaList

    start = time.perf_counter()
    out = loaded.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        **cache_kwargs(loaded.model, cache),
        max_new_tokens=sample.max_new_tokens,
        do_sample=False,
        pad_token_id=loaded.tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([_Answered(loaded.tokenizer, ids.shape[1], sample.expected)]),
    )
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    return loaded.tokenizer.decode(new, skip_special_tokens=True), seconds, len(new)


def _random_plan(kv: Any, info: Any, like: Any, seed: int) -> Any:
    """As many full KV heads as ``like`` keeps, drawn at random among the global layers' heads
    (the model's own sliding layers stay as they are, full in every plan)."""
    rng = random.Random(seed)
    sliding = [t == "sliding" for t in like.layer_types]
    cells = [(lyr, k) for lyr in range(info.n_layers) for k in range(info.n_kv_heads) if not sliding[lyr]]
    chosen = rng.sample(cells, like.n_full())
    heads: list[list[int]] = [list(range(info.n_kv_heads)) if s else [] for s in sliding]
    for layer, k in chosen:
        heads[layer].append(k)
    return kv.from_heads(
        info,
        heads,
        sink=like.sink,
        recent=like.recent,
        compensate=like.compensate,
        layer_types=like.layer_types,
    )


def _resolved_rows(kv: Any, loaded: Any, args: argparse.Namespace, fractions: list[float], length: int,
                   types: list[str]) -> dict[str, Any]:  # fmt: skip
    """The ``--moa`` and ``--replan`` rows: each saved profile or gate set planned at every fraction
    for ``length`` tokens (the same byte budget as the atlas rows of that length)."""
    import numpy as np

    from headatlas.apps.kv import moa
    from headatlas.apps.kv.fit import gate_atlas

    rows: dict[str, Any] = {}
    for spec in args.moa:
        label, path = spec.split("=", 1)
        path, _, sensitivity = path.partition(":")
        saved = kv.Plan.load(path)
        for f in fractions:
            rows[f"{label} {f:g}"] = moa.replan(
                loaded.info, saved, f, length, sensitivity or None, layer_types=types
            )
    for spec in args.replan:
        label, path = spec.split("=", 1)
        saved = kv.Plan.load(path)
        gates = gate_atlas(loaded, np.asarray(saved.scores))
        for f in fractions:
            rows[f"{label} {f:g}"] = kv.plan(
                gates, keep_fraction=f, by="duo_gate", sink=saved.sink, recent=saved.recent,
                context=length, layer_types=types,
            )  # fmt: skip
    return rows


def _add(stats: dict[str, dict[str, float]], label: str, **values: float) -> None:
    row = stats.setdefault(label, {"n": 0})
    row["n"] += 1
    for key, value in values.items():
        if key.startswith("peak"):
            row[key] = max(row.get(key, 0.0), value)
        else:
            row[key] = row.get(key, 0.0) + value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--atlas", default="/tmp/kv-atlas")
    parser.add_argument("--by", default="retrieval")
    parser.add_argument("--tasks", default="niah,multikey,multivalue,vt")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--n", type=int, default=5, help="samples per task and length")
    parser.add_argument("--fractions", default="0.5,0.25,0.125")
    parser.add_argument("--random-fractions", default="0.25", help="fractions that get a random-plan row")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--recent", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk of the streaming-prefill row")
    parser.add_argument("--streaming-fraction", type=float, default=0.25)
    parser.add_argument("--no-streaming-row", action="store_true", help="skip the streaming-prefill row")
    parser.add_argument(
        "--also-by", default="", metavar="BY;BY",
        help="more atlas rules (';'-separated `kv plan --by` values), each a row at --streaming-fraction",
    )  # fmt: skip
    parser.add_argument(
        "--plan", action="append", default=[], metavar="LABEL=PLAN.json",
        help="a saved plan as one more row (e.g. one from `headatlas kv fit`); made for --lengths",
    )  # fmt: skip
    parser.add_argument(
        "--moa", action="append", default=[], metavar="LABEL=PLAN.json[:mass]",
        help="a `kv fit --method moa` plan's profile, solved again at every --fractions and length (MoA "
        "rows; `:mass` uses the attention-mass costs instead of the recorded ones)",
    )  # fmt: skip
    parser.add_argument(
        "--replan", action="append", default=[], metavar="LABEL=PLAN.json",
        help="a `kv fit` plan's gates, planned again at every --fractions and length (binary rows)",
    )  # fmt: skip
    parser.add_argument(
        "--compensate-row", action="store_true",
        help="add an atlas row at --streaming-fraction with RazorAttention's compensation token",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--export-tasks", default=None, metavar="FILE",
        help="write the prompts (text and token ids) and expected answers as JSON for bench_kvpress.py, then stop",
    )  # fmt: skip
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    if args.export_tasks:
        _export_tasks(args)
        return
    from transformers import DynamicCache

    import headatlas as ha
    from headatlas.apps import kv
    from headatlas.apps.kv.cache import layer_nbytes
    from headatlas.apps.kv.evaluate import encode
    from headatlas.apps.kv.tasks import make_samples
    from headatlas.atlas.table import Atlas
    from headatlas.data.ud import ewt_sentences

    loaded = ha.load(args.model)
    atlas = Atlas.load(args.atlas)
    haystack = ewt_sentences("train")
    fractions = [float(f) for f in args.fractions.split(",")]
    types = kv.layer_types(loaded.model)  # Gemma 3's sliding layers keep their own window
    results: dict[str, Any] = {
        "model": loaded.info.name,
        "atlas": args.atlas,
        "by": args.by,
        "sink": args.sink,
        "recent": args.recent,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "threads": args.threads,
        "rss_after_load_mib": current_rss_mib(),
        "cells": {},
    }
    wall = time.perf_counter()
    for length in [int(x) for x in args.lengths.split(",")]:

        def atlas_plan(f: float, by: str = args.by, compensate: bool = False, length: int = length) -> Any:
            return kv.plan(
                atlas, keep_fraction=f, by=by, sink=args.sink, recent=args.recent, context=length,
                compensate=compensate, layer_types=types,
            )  # fmt: skip

        plans: dict[str, Any] = {f"atlas {f:g}": atlas_plan(f) for f in fractions}
        for f in [float(x) for x in args.random_fractions.split(",") if x]:
            plans[f"random {f:g}"] = _random_plan(kv, loaded.info, plans[f"atlas {f:g}"], args.seed)
        at = args.streaming_fraction
        for by in [b for b in args.also_by.split(";") if b]:
            plans[f"atlas {at:g} by {by}"] = atlas_plan(at, by=by)
        if args.compensate_row:
            plans[f"atlas {at:g}, compensate"] = atlas_plan(at, compensate=True)
        for spec in args.plan:
            label, path = spec.split("=", 1)
            plans[label] = kv.Plan.load(path)
        plans.update(_resolved_rows(kv, loaded, args, fractions, length, types))
        stream_label = f"atlas {at:g}, streaming prefill"
        for task in args.tasks.split(","):
            samples = make_samples(loaded.tokenizer, task, length, args.n, seed=args.seed, haystack=haystack)
            stats: dict[str, dict[str, float]] = {}
            answers: dict[str, list[str]] = {}  # per row, every sample's answer in order
            for sample in samples:
                ids = encode(loaded.tokenizer, sample)
                plain = ha_cache = None
                reset_peak_rss()
                with torch.no_grad():
                    plain = DynamicCache(config=loaded.model.config)
                    start = time.perf_counter()
                    kv.prefill(loaded, plain, ids, chunk=ids.shape[1])
                    full_prefill = time.perf_counter() - start
                peak_prefill = peak_since_reset_mib()
                full_bytes = sum(layer_nbytes(layer) for layer in plain.layers)
                for label, p in [("full", None), *plans.items()]:
                    reset_peak_rss()
                    start = time.perf_counter()
                    if p is None:
                        ha_cache = copy.deepcopy(plain)
                        ctx: Any = contextlib.nullcontext(ha_cache)
                    else:
                        ctx = kv.compressed(loaded, p, source=plain)
                    with ctx as cache, torch.no_grad():
                        compress = time.perf_counter() - start if p is not None else 0.0
                        held = sum(layer_nbytes(layer) for layer in cache.layers)
                        text, seconds, n_new = _decode(loaded, ids, cache, sample)
                    answers.setdefault(label, []).append(text)
                    _add(
                        stats, label, correct=float(sample.correct(text)), kv_bytes=held,
                        kept=held / full_bytes, prefill_s=full_prefill + compress,
                        decode_ms=1000 * seconds / max(1, n_new), peak_prefill_mib=peak_prefill,
                        peak_decode_mib=peak_since_reset_mib(),
                    )  # fmt: skip
                del plain, ha_cache
                if args.no_streaming_row:
                    continue
                p = plans[f"atlas {args.streaming_fraction:g}"]
                reset_peak_rss()
                with kv.compressed(loaded, p, streaming_prefill=True) as cache, torch.no_grad():
                    start = time.perf_counter()
                    kv.prefill(loaded, cache, ids, chunk=args.chunk)
                    pre = time.perf_counter() - start
                    peak_pre = peak_since_reset_mib()
                    held = cache.nbytes()
                    reset_peak_rss()
                    text, seconds, n_new = _decode(loaded, ids, cache, sample)
                answers.setdefault(stream_label, []).append(text)
                _add(
                    stats, stream_label, correct=float(sample.correct(text)), kv_bytes=held,
                    kept=held / full_bytes, prefill_s=pre, decode_ms=1000 * seconds / max(1, n_new),
                    peak_prefill_mib=peak_pre, peak_decode_mib=peak_since_reset_mib(),
                )  # fmt: skip
            cell = {}
            for label, row in stats.items():
                n = row["n"]
                cell[label] = {
                    "n": int(n),
                    "accuracy": round(100 * row["correct"] / n, 1),
                    "kv_mib": round(row["kv_bytes"] / n / 2**20, 3),
                    "kv_kept": round(row["kept"] / n, 4),
                    "prefill_s": round(row["prefill_s"] / n, 3),
                    "decode_ms": round(row["decode_ms"] / n, 2),
                    "peak_prefill_mib": round(row["peak_prefill_mib"], 1),
                    "peak_decode_mib": round(row["peak_decode_mib"], 1),
                }
            results["cells"][f"{task} {length}"] = cell
            results.setdefault("answers", {})[f"{task} {length}"] = {
                "expected": [list(sample.expected) for sample in samples], **answers,
            }  # fmt: skip
            print(json.dumps({f"{task} {length}": cell}), flush=True)
    results["wall_s"] = round(time.perf_counter() - wall, 1)
    _summary(results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


def _export_tasks(args: argparse.Namespace) -> None:
    """Write the samples this script would run (same model, tasks, lengths, n, seed) as JSON.

    ``bench_kvpress.py`` runs in kvpress's venv (transformers < 5.3), where headatlas cannot be
    imported; it reads this file so that its rows see exactly the prompts of the rows here.
    """
    import headatlas as ha
    from headatlas.apps.kv.evaluate import encode
    from headatlas.apps.kv.tasks import make_samples
    from headatlas.data.ud import ewt_sentences

    loaded = ha.load(args.model)
    haystack = ewt_sentences("train")
    samples = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for task in args.tasks.split(","):
            for sample in make_samples(
                loaded.tokenizer, task, length, args.n, seed=args.seed, haystack=haystack
            ):
                samples.append(
                    {
                        "task": task,
                        "length": length,
                        "prompt": sample.prompt,
                        "input_ids": encode(loaded.tokenizer, sample)[0].tolist(),
                        "expected": list(sample.expected),
                        "max_new_tokens": sample.max_new_tokens,
                    }
                )
    meta = {
        "model": loaded.info.name,
        "seed": args.seed,
        "n": args.n,
        "tasks": args.tasks,
        "lengths": args.lengths,
    }
    with open(args.export_tasks, "w") as fh:
        json.dump({**meta, "samples": samples}, fh, indent=1)
    print(f"{len(samples)} samples → {args.export_tasks}")


def _summary(results: dict[str, Any]) -> None:
    """Print one Markdown table: per row, accuracy over all cells and means of the other columns."""
    rows: dict[str, list[dict[str, float]]] = {}
    for cell in results["cells"].values():
        for label, row in cell.items():
            rows.setdefault(label, []).append(row)
    full = rows["full"]
    base_decode = sum(r["decode_ms"] for r in full) / len(full)
    print(f"\n{results['model']}, cells: {', '.join(results['cells'])}; wall {results['wall_s']} s")
    print(
        "| cache | n | accuracy % | KV kept | KV MiB after prefill | peak RSS prefill / decode MiB | prefill s | decode ms/token | decode vs full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, cells in rows.items():
        n = sum(r["n"] for r in cells)
        acc = sum(r["accuracy"] * r["n"] for r in cells) / n

        def mean(key: str, cells: list[dict[str, float]] = cells) -> float:
            return sum(r[key] for r in cells) / len(cells)

        print(
            f"| {label} | {n} | {acc:.1f} | {100 * mean('kv_kept'):.1f} % | {mean('kv_mib'):.2f} | "
            f"{max(r['peak_prefill_mib'] for r in cells):.0f} / {max(r['peak_decode_mib'] for r in cells):.0f} | "
            f"{mean('prefill_s'):.2f} | {mean('decode_ms'):.1f} | {base_decode / mean('decode_ms'):.2f}× |"
        )


if __name__ == "__main__":
    main()
