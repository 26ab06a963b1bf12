"""Head-level circuits by faithfulness curves (issue 31): CPR / CMD / minimal circuit of each ranking
method on one task, and the seeds' head counts (arithmetic per operator, acronym share, ICL top 1 %).

Examples (1 torch thread, ``nice -n 10``; each ≤ 15 min on the 2-core CPU at 135M):

    python bench/bench_circuits.py curves --task ioi --methods activation,eap-ig,attribution,random
    python bench/bench_circuits.py operators --methods eap-ig,random
    python bench/bench_circuits.py icl-top1 --task icl
    python bench/bench_circuits.py edges --task ioi --methods eap-ig --top 10 --n 8  # head → head edges
    python bench/bench_circuits.py accuracy --model gemma3-270m --n 32     # every task's clean accuracy
    python bench/bench_circuits.py figure --results bench/results/circuits-gemma3-270m-curves-*.json

Writes ``bench/results/circuits-<model>-<what>.json`` (every number, wall times included).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import headatlas as ha
from benchlib import strict_json
from headatlas.apps.common.circuit_tasks import circuit_task, encode_exact
from headatlas.apps.patch.circuits import measure_circuits
from headatlas.apps.patch.faithfulness import prepare
from headatlas.apps.patch.rankings import method_scores, order_by, random_order
from headatlas.core.heads import head_name

RESULTS = Path(__file__).parent / "results"


def _curves(args: argparse.Namespace, loaded: ha.LoadedModel) -> dict:
    task = circuit_task(loaded.tokenizer, args.task, args.n, args.seed)
    result = measure_circuits(
        loaded, task, args.methods.split(","), args.ablation, steps=args.steps,
        seeds=tuple(range(args.seeds)), rows_per_pass=args.rows_per_pass, only_correct=not args.all_pairs,
    )  # fmt: skip
    return result.as_dict()


def _operators(args: argparse.Namespace, loaded: ha.LoadedModel) -> dict:
    out = {}
    for op in "+-*/":
        task = circuit_task(loaded.tokenizer, f"arithmetic:{op}", args.n, args.seed)
        result = measure_circuits(
            loaded, task, args.methods.split(","), args.ablation, steps=args.steps,
            seeds=tuple(range(args.seeds)), rows_per_pass=args.rows_per_pass, only_correct=not args.all_pairs,
        )  # fmt: skip
        out[op] = result.as_dict()
    return out


def _top_accuracy(loaded: ha.LoadedModel, enc, heads) -> float:  # type: ignore[no-untyped-def]
    from headatlas.apps.common.patch_tasks import last_logits

    with ha.ablate(loaded, heads, mode=args_mode), torch.no_grad():
        logits = last_logits(loaded, enc.clean)
    return float((logits.argmax(-1).cpu() == enc.answer).float().mean())


args_mode = "mean"


def _icl_top1(args: argparse.Namespace, loaded: ha.LoadedModel) -> dict:
    """ICL accuracy (top-1 answer on the clean prompts) with the top 1 % (``--share``) of heads by
    EAP-IG ablated, against random 1 % (Yu & Ananiadou 2024 report 87.6 % → 24.4 % with 1 % of heads)."""
    task = circuit_task(loaded.tokenizer, args.task, args.n, args.seed)
    enc = encode_exact(loaded, task)
    prep = prepare(loaded, enc)
    info = loaded.info
    total = info.n_layers * info.n_heads
    k = max(1, round(total * args.share))
    out: dict = {
        "task": task.name,
        "n_pairs": len(task.pairs),
        "k": k,
        "share": args.share,
        "total_heads": total,
        "ablation": args_mode,
    }
    out["accuracy"] = _top_accuracy(loaded, enc, [])
    for method in args.methods.split(","):
        if method == "random":
            accs = [
                _top_accuracy(loaded, enc, random_order(info.n_layers, info.n_heads, s)[:k])
                for s in range(args.seeds)
            ]
            out["random"] = {"accuracy_mean": float(np.mean(accs)), "per_seed": accs}
            continue
        start = time.perf_counter()
        score, _ = method_scores(loaded, prep, method, args.steps, args.rows_per_pass)
        heads = order_by(score)[:k]
        out[method] = {
            "heads": [head_name(*h) for h in heads],
            "accuracy": _top_accuracy(loaded, enc, heads),
            "seconds": round(time.perf_counter() - start, 2),
        }
    return out


def _edges(args: argparse.Namespace, loaded: ha.LoadedModel) -> dict:
    """Head → head edges among the top ``--top`` heads of the first method's ranking, by path
    patching (q, k, v and the logits), on the pairs the model gets right; the time per edge and what
    every pair of heads in different layers would cost at that rate."""
    from headatlas.apps.patch.circuits import correct_pairs
    from headatlas.apps.patch.edges import LOGITS, circuit_edges

    task = circuit_task(loaded.tokenizer, args.task, args.n, args.seed)
    task = correct_pairs(task, prepare(loaded, encode_exact(loaded, task)))
    enc = encode_exact(loaded, task)
    prep = prepare(loaded, enc)
    method = args.methods.split(",")[0]
    score, ranking_seconds = method_scores(loaded, prep, method, args.steps, args.rows_per_pass)
    heads = order_by(score)[: args.top]
    edges = circuit_edges(loaded, enc, heads, rows_per_pass=args.rows_per_pass)
    inner = edges.table[edges.table["receiver"] != LOGITS]
    info = loaded.info
    every = 3 * info.n_heads**2 * info.n_layers * (info.n_layers - 1) // 2  # sender layer < receiver layer
    per_edge = edges.seconds / max(1, len(inner))
    return {
        "task": task.name, "n_pairs": len(task.pairs), "method": method, "top": len(edges.heads),
        "heads": [head_name(*h) for h in edges.heads], "ranking_seconds": round(ranking_seconds, 2),
        "edges_seconds": round(edges.seconds, 2), "forward_passes": edges.passes, "n_edges": len(inner),
        "seconds_per_edge": round(per_edge, 4), "all_edges": every,
        "all_edges_hours_at_this_rate": round(every * per_edge / 3600, 1),
        "strongest": edges.strongest(10).to_dict("records"), "edges": edges.table.to_dict("records"),
    }  # fmt: skip


ACCURACY_TASKS = (
    "ioi", "greater-than", "arithmetic", "arithmetic:+", "arithmetic:-", "arithmetic:*", "arithmetic:/",
    "acronym", "mcqa", "icl", "icl:country-capital", "sequence",
)  # fmt: skip


def _accuracy(args: argparse.Namespace, loaded: ha.LoadedModel) -> dict:
    """The model's own accuracy (answer logit above the wrong one's) on each task's clean prompts,
    measured before any circuit: a task counts when it is at least 0.70."""
    out = {}
    tasks = args.task.split(",") if args.task != "ioi" else ACCURACY_TASKS
    for name in tasks:
        start = time.perf_counter()
        try:
            task = circuit_task(loaded.tokenizer, name, args.n, args.seed)
        except ha.HeadatlasError as exc:
            out[name] = {"error": str(exc)}
            print(f"  {name:22s} {exc}", flush=True)
            continue
        prep = prepare(loaded, encode_exact(loaded, task))
        out[name] = {
            "n_pairs": len(task.pairs),
            "accuracy": round(prep.accuracy, 4),
            "clean_metric": round(float(prep.clean_metric.mean()), 4),
            "counterfactual_metric": round(float(prep.corrupt_metric.mean()), 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"  {name:22s} accuracy {out[name]['accuracy']:.2f} on {len(task.pairs)} pairs", flush=True)
    return out


def _figures(paths: list[str], out: Path) -> None:
    """Draw the curves of committed ``curves`` results (``circuits-<model>-curves-<tag>-<ablation>.json``)
    as ``out/circuits-<model>-<tag>-<ablation>.png``."""
    from headatlas.apps.patch.circuit_figures import curves_figure
    from headatlas.apps.patch.circuits import figure_curve

    for path in paths:
        record = json.loads(Path(path).read_text())
        data = record["result"]
        curves = {name: figure_curve(entry) for name, entry in data["methods"].items()}
        stem = Path(path).stem.replace("-curves-", "-")
        title = f"{data['model']} — {data['task']} ({data['ablation']} ablation, {data['baseline']['n_pairs']} pairs)"
        print(curves_figure(curves, data["total_heads"], title, out / f"{stem}.png"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("accuracy", "curves", "operators", "icl-top1", "edges", "figure"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--methods", default="eap-ig,attribution,random")
    parser.add_argument("--ablation", default="counterfactual")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-per-pass", type=int, default=64)
    parser.add_argument("--tag", default="")
    parser.add_argument("--top", type=int, default=10, help="edges: heads of the ranking the edges join")
    parser.add_argument("--share", type=float, default=0.01, help="icl-top1: the share of heads ablated")
    parser.add_argument("--all-pairs", action="store_true", help="keep pairs the model gets wrong too")
    parser.add_argument("--results", nargs="*", default=[], help="figure: the curves results to draw")
    parser.add_argument("--figures", default="docs/figures", help="figure: where the PNGs go")
    args = parser.parse_args()
    if args.what == "figure":
        _figures(args.results, Path(args.figures))
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    loaded = ha.load(args.model)
    run = {
        "accuracy": _accuracy, "curves": _curves, "operators": _operators, "icl-top1": _icl_top1, "edges": _edges,
    }[args.what]  # fmt: skip
    data = run(args, loaded)
    record = {
        "what": args.what, "model": loaded.info.name, "args": vars(args), "result": data,
        "wall_seconds": round(time.perf_counter() - start, 1), "threads": 1,
    }  # fmt: skip
    tag = args.tag or (args.task if args.what != "operators" else "arithmetic")
    ablation = {"icl-top1": args_mode, "edges": "path"}.get(args.what, args.ablation)
    name = f"circuits-{args.model}-{args.what}-{tag}-{ablation}.json"
    if args.what == "accuracy":
        name = f"circuits-{args.model}-accuracy{'-' + args.tag if args.tag else ''}.json"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(strict_json(record, indent=1) + "\n")
    print(f"{name}: {record['wall_seconds']} s")
    if args.what == "curves":
        for method, entry in data["methods"].items():
            print(f"  {method:12s} CPR {entry['cpr']:.3f} CMD {entry['cmd']:.3f} minimal k {entry['minimal_k']} "
                  f"stable k {entry.get('stable_k')} ranking {entry.get('ranking_seconds')} s")  # fmt: skip


if __name__ == "__main__":
    main()
