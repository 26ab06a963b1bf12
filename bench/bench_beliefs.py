"""Knowledge-conflict heads with PH3 (Jin et al. 2024) and safety heads with Ships (Zhou et al. 2024).

``conflict``: builds the conflict set of facts the model knows, scores every head's direct
contribution to logit(memory) − logit(context) on one half of the facts, and on the other half
measures memory-use and context-use rates with nothing pruned, the top-k heads of one side pruned
(zero-ablated) and k random heads pruned (several seeds), for both directions and each k.

``safety``: Ships for every head on a few harmful requests, then refusal rates on held-out harmful
requests and the cost on harmless ones with the top-k heads ablated against k random heads.

Writes ``bench/results/<part>-<model>.json``. Usage::

    nice -n 10 .venv/bin/python bench/bench_beliefs.py conflict --model default --ks 5,10 --seeds 3
    nice -n 10 .venv/bin/python bench/bench_beliefs.py safety --model default --k 5 --seeds 3
    nice -n 10 .venv/bin/python bench/bench_beliefs.py refusal --model qwen2.5-coder-0.5b

``refusal``: the model's own refusal rates (nothing ablated) on all 32 + 32 requests.

``safety-topk``: the top ``--k`` heads of a stored ``safety`` run's Ships ranking (at most 10)
ablated together against ``--k`` random heads, on the same held-out requests; writes
``results/safety-topk<k>-<model>.json``::

    nice -n 10 .venv/bin/python bench/bench_beliefs.py safety-topk --model qwen2.5-coder-0.5b --k 10 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchlib import cpu_model, quiet, strict_json

RESULTS = Path(__file__).parent / "results"


def conflict(args: argparse.Namespace) -> dict[str, object]:
    import headatlas as ha
    from headatlas.apps.conflict.items import conflict_items, split_items
    from headatlas.apps.conflict.ph3 import PAPER, direct_contributions, random_heads, top_heads, usage
    from headatlas.core.heads import head_name

    loaded = ha.load(args.model)
    info = loaded.info
    start = time.perf_counter()
    items = conflict_items(loaded, args.seed, args.alternatives)
    score_items, test_items = split_items(items, args.seed)
    contrib = direct_contributions(loaded, score_items)
    scores = contrib.mean(0).numpy()
    scored_s = time.perf_counter() - start
    before = usage(loaded, test_items)
    runs = []
    for prefer in ("memory", "context"):
        for k in [int(x) for x in args.ks.split(",")]:
            heads = top_heads(scores, prefer, k)
            after = usage(loaded, test_items, heads)
            randoms = [
                asdict(
                    usage(
                        loaded,
                        test_items,
                        random_heads(info.n_layers, info.n_heads, k, 1000 * args.seed + s + 1),
                    )
                )
                for s in range(args.seeds)
            ]
            gains = [100 * (r[prefer] - getattr(before, prefer)) for r in randoms]
            row = {
                "prefer": prefer,
                "k": k,
                "heads": [head_name(*h) for h in heads],
                "after": asdict(after),
                "gain_points": 100 * (getattr(after, prefer) - getattr(before, prefer)),
                "random": randoms,
                "random_gain_points_mean": float(torch.tensor(gains).mean()),
                "random_gain_points_std": float(torch.tensor(gains).std(unbiased=False)),
                "paper_gain_percent": PAPER[prefer],
            }
            runs.append(row)
            print(
                f"prefer {prefer:<7} k={k:<3} {prefer} use {getattr(before, prefer):.1%} → {getattr(after, prefer):.1%} "
                f"({row['gain_points']:+.1f} pts; random {row['random_gain_points_mean']:+.1f} ± "
                f"{row['random_gain_points_std']:.1f}) heads {', '.join(row['heads'][:5])}",
                flush=True,
            )
    order = scores.reshape(-1).argsort()
    n_heads = info.n_heads
    return {
        "model": info.name,
        "n_items": len(items),
        "alternatives": args.alternatives,
        "n_facts_known": len({i.fact for i in items}),
        "n_score_items": len(score_items),
        "n_test_items": len(test_items),
        "template": "Context: {prompt} {context answer}.\\n{prompt}",
        "before": asdict(before),
        "runs": runs,
        "top_context_heads": [
            {"head": head_name(*divmod(int(i), n_heads)), "conflict": float(scores.reshape(-1)[i])}
            for i in order[:8]
        ],
        "top_memory_heads": [
            {"head": head_name(*divmod(int(i), n_heads)), "conflict": float(scores.reshape(-1)[i])}
            for i in order[::-1][:8]
        ],
        "score_seconds": scored_s,
        "seconds": time.perf_counter() - start,
    }


def safety(args: argparse.Namespace) -> dict[str, object]:
    import headatlas as ha
    from headatlas.apps.safety.ships import safety_heads

    loaded = ha.load(args.model)
    last = [time.perf_counter()]

    def progress(done: int, total: int) -> None:
        if done % 30 == 0 or done >= total - 5:
            print(f"{done}/{total} {time.perf_counter() - last[0]:.0f} s", flush=True)

    result = safety_heads(loaded, args.k, args.seeds, args.seed, args.n_score, args.n_harmless, progress)
    out = result.to_dict()
    out["model"] = loaded.info.name
    return out


def safety_topk(args: argparse.Namespace) -> dict[str, object]:
    """Top-k heads by the Ships ranking a ``safety`` run stored (its ``top_ships``, up to 10 heads),
    ablated together against k random heads: the same held-out requests and measures, without
    scoring every head again."""
    import random

    import headatlas as ha
    from headatlas.apps.safety.prompts import HARMFUL, HARMLESS
    from headatlas.apps.safety.ships import behaviour, chat_prompts, replies, split_requests
    from headatlas.core.heads import head_name

    name = args.model.replace("/", "_")
    stored = json.loads((RESULTS / f"safety-{name}.json").read_text())
    ranking = [row["head"] for row in stored["top_ships"]]
    if args.k > len(ranking):
        raise SystemExit(f"the stored ranking has {len(ranking)} heads, fewer than --k {args.k}")
    loaded = ha.load(args.model)
    info = loaded.info
    _, test_requests = split_requests(HARMFUL, args.seed)
    harmful = chat_prompts(loaded, test_requests)
    harmless = chat_prompts(loaded, HARMLESS[: args.n_harmless])
    base_replies = replies(loaded, harmless)
    top = ranking[: args.k]
    out: dict[str, object] = {
        "model": info.name,
        "k": args.k,
        "heads": top,
        "ranking_from": f"results/safety-{name}.json",
        "before": stored["before"],
        "after": behaviour(loaded, harmful, harmless, base_replies, top),
    }
    randoms = []
    for s in range(args.seeds):
        flat = random.Random(args.seed * 1000 + 100 + s).sample(range(info.n_layers * info.n_heads), args.k)
        heads = [head_name(*divmod(i, info.n_heads)) for i in flat]
        randoms.append(
            {
                "seed": s,
                "heads": heads,
                "behaviour": behaviour(loaded, harmful, harmless, base_replies, heads),
            }
        )
        print(f"random {s}: {randoms[-1]['behaviour']}", flush=True)
    out["random"] = randoms
    return out


def refusal(args: argparse.Namespace) -> dict[str, object]:
    """The model's own refusal behaviour (nothing ablated) on all 32 harmful and 32 harmless requests."""
    import headatlas as ha
    from headatlas.apps.safety.prompts import HARMFUL, HARMLESS, REFUSAL_MARKERS, REFUSAL_OPENINGS
    from headatlas.apps.safety.ships import behaviour, chat_prompts, replies

    loaded = ha.load(args.model)
    harmful, harmless = chat_prompts(loaded, HARMFUL), chat_prompts(loaded, HARMLESS)
    out = behaviour(loaded, harmful, harmless, replies(loaded, harmless))
    decode = loaded.tokenizer.decode
    return {
        "model": loaded.info.name,
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "behaviour": out,
        "harmful_replies": [decode(list(r), skip_special_tokens=True) for r in replies(loaded, harmful[:6])],
        "openings": list(REFUSAL_OPENINGS),
        "markers": list(REFUSAL_MARKERS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("conflict", "safety", "safety-topk", "refusal"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--ks", default="5,10", help="conflict: k values")
    parser.add_argument("--alternatives", type=int, default=2, help="conflict: context answers per fact")
    parser.add_argument("--k", type=int, default=5, help="safety: heads ablated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-score", type=int, default=8, help="safety: harmful requests Ships is scored on")
    parser.add_argument("--n-harmless", type=int, default=16, help="safety: harmless requests for the cost")
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = {"conflict": conflict, "safety": safety, "safety-topk": safety_topk, "refusal": refusal}[
        args.part
    ](args)
    result["wall_seconds"] = time.perf_counter() - start
    result["cpu"] = cpu_model()
    result["torch_threads"] = 1
    RESULTS.mkdir(exist_ok=True)
    name = args.model.replace("/", "_")
    stem = f"{args.part}{args.k}" if args.part == "safety-topk" else args.part
    path = RESULTS / f"{stem}-{name}.json"
    path.write_text(strict_json(result, indent=1, default=str) + "\n")
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("runs", "random")}, indent=1, default=str)[
            :3000
        ]
    )
    print(f"→ {path}")


if __name__ == "__main__":
    main()
