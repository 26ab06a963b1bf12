"""Negative-bias, semantic induction and active–dormant heads: the score, then top-k heads against
random heads with the task's own metric (issue 32, items 3–5).

- ``--part negative`` (Yu et al. 2024): NAS per head on balanced yes/no questions, the model's
  yes/no precision and recall, and how they move when the top-k NAS heads are ablated or scaled,
  against k random heads (several seeds).
- ``--part semantic`` (Ren et al. 2024): semantic induction per relation type; the tail token's
  log-probability with the top-k heads of each relation ablated against k random heads; the rank
  correlation of each relation's score with plain induction (``repeat`` battery).
- ``--part dormant`` (Guo et al. 2024): value norm at the sink, output norm, dormancy per domain;
  the loss over the domains with the k most dormant heads ablated, against k random heads and the k
  sink heads that read the first token most.

Writes ``bench/results/heads-more-<part>-<model>.json``. Usage (from the repository root)::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_heads_more.py --part negative --model default
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import cpu_model, quiet, strict_json

OUT = Path(__file__).parent / "results"


def head_names(flat: np.ndarray, n_heads: int) -> list[str]:
    return [f"L{int(i) // n_heads}H{int(i) % n_heads}" for i in flat]


def top_heads(matrix: np.ndarray, k: int, largest: bool = True) -> list[str]:
    flat = np.nan_to_num(matrix.reshape(-1), nan=-np.inf if largest else np.inf)
    order = np.argsort(-flat if largest else flat, kind="stable")
    return head_names(order[:k], matrix.shape[1])


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[str]:
    pick = np.random.default_rng(seed).choice(n_layers * n_heads, size=k, replace=False)
    return head_names(pick, n_heads)


def part_negative(loaded: Any, args: argparse.Namespace) -> dict[str, Any]:
    import headatlas as ha
    from headatlas.functional import FunctionalConfig
    from headatlas.functional.negative import answer_margins, run_negative, scaled_heads, yes_no_report

    info = loaded.info
    start = time.perf_counter()
    result = run_negative(loaded, FunctionalConfig(n_prompts=args.n_score, batch_size=8))
    score_s = time.perf_counter() - start
    nas = result.stats.mean("negative_attention")
    evaluation = FunctionalConfig(n_prompts=args.n_eval, seed=1, batch_size=8)

    def report() -> dict[str, float]:
        questions, margins = answer_margins(loaded, evaluation)
        return yes_no_report([q.gold for q in questions], margins)

    rows: dict[str, Any] = {"baseline": report()}
    for k in args.ks:
        top = top_heads(nas, k)
        with ha.ablate(loaded, top):
            rows[f"top{k}_ablated"] = {"heads": top, **report()}
        rand = []
        for seed in range(args.seeds):
            heads = random_heads(info.n_layers, info.n_heads, k, seed)
            with ha.ablate(loaded, heads):
                rand.append({"heads": heads, **report()})
        rows[f"random{k}_ablated"] = rand
    k = max(args.ks)
    for factor in args.factors:
        with scaled_heads(loaded, top_heads(nas, k), factor):
            rows[f"top{k}_scaled_{factor:g}"] = report()
    bottom = top_heads(nas, k, largest=False)
    with ha.ablate(loaded, bottom):
        rows[f"most_negative{k}_ablated"] = {"heads": bottom, **report()}
    return {
        "score_s": round(score_s, 1),
        "n_score_questions": int(result.params["n_questions"]),
        "n_eval_questions": args.n_eval,
        "score_answers": result.params["answers"],
        "nas_top": [{"head": h, "nas": float(nas.reshape(-1)[i])} for h, i in _top_with_index(nas, 10)],
        "nas_mean": float(np.nanmean(nas)),
        "negative_bias_heads": int((nas >= 1.0).sum()),
        "eval": rows,
    }


def _top_with_index(matrix: np.ndarray, k: int) -> list[tuple[str, int]]:
    order = np.argsort(-np.nan_to_num(matrix.reshape(-1), nan=-np.inf), kind="stable")[:k]
    return list(zip(head_names(order, matrix.shape[1]), order.tolist(), strict=True))


def part_semantic(loaded: Any, args: argparse.Namespace) -> dict[str, Any]:
    from scipy.stats import spearmanr

    import headatlas as ha
    from headatlas.functional import FunctionalConfig
    from headatlas.functional.semantic import RELATIONS, run_semantic, tail_logprobs

    info = loaded.info
    config = FunctionalConfig(n_prompts=args.n_score, batch_size=8)
    start = time.perf_counter()
    result = run_semantic(loaded, config)
    score_s = time.perf_counter() - start
    induction = ha.scan(loaded, probes=["repeat"], n_prompts=16, seq_len=128).matrix("induction")
    scores = {r: result.stats.mean(f"semantic_{r}") for r in RELATIONS}
    evaluation = FunctionalConfig(n_prompts=args.n_score, seed=1, batch_size=8)
    rows: dict[str, Any] = {"baseline": tail_logprobs(loaded, evaluation)}
    k = max(args.ks)
    for relation in RELATIONS:
        top = top_heads(scores[relation], k)
        with ha.ablate(loaded, top):
            rows[f"top{k}_{relation}_ablated"] = {"heads": top, **tail_logprobs(loaded, evaluation)}
    top = top_heads(induction, k)
    with ha.ablate(loaded, top):
        rows[f"top{k}_induction_ablated"] = {"heads": top, **tail_logprobs(loaded, evaluation)}
    for seed in range(args.seeds):
        heads = random_heads(info.n_layers, info.n_heads, k, seed)
        with ha.ablate(loaded, heads):
            rows[f"random{k}_seed{seed}"] = {"heads": heads, **tail_logprobs(loaded, evaluation)}
    summary = {}
    for relation in RELATIONS:
        m = scores[relation]
        rho = spearmanr(m.reshape(-1), induction.reshape(-1)).statistic
        summary[relation] = {
            "top": [{"head": h, "score": float(m.reshape(-1)[i])} for h, i in _top_with_index(m, 5)],
            "heads_over_1": int((m >= 1.0).sum()),
            "spearman_with_induction": float(rho),
            "n_examples": int(result.params["n_examples"][relation]),
        }
    return {"score_s": round(score_s, 1), "relations": summary, "k": k, "eval": rows}


def part_dormant(loaded: Any, args: argparse.Namespace) -> dict[str, Any]:
    import headatlas as ha
    from headatlas.functional import FunctionalConfig
    from headatlas.functional.dormant import DORMANT_SCORES, domain_losses, run_dormant

    info = loaded.info
    config = FunctionalConfig(n_prompts=args.n_score, batch_size=8)
    start = time.perf_counter()
    result = run_dormant(loaded, config)
    score_s = time.perf_counter() - start
    m = {name: result.stats.mean(name) for name in DORMANT_SCORES}
    table = result.tables["dormant_domains"]
    by_domain = table.pivot_table(index=["layer", "head"], columns="domain", values="dormancy")
    active_dormant = by_domain[(by_domain.max(axis=1) >= 0.75) & (by_domain.min(axis=1) <= 0.25)]
    domains = {
        d: {
            "dormant_heads": int((by_domain[d] >= 0.5).sum()),
            "mean_dormancy": float(by_domain[d].mean()),
            "mean_sink_value_norm": float(table[table.domain == d].sink_value_norm.mean()),
            "sink_heads": int((table[table.domain == d].first_token >= 0.6).sum()),
        }
        for d in by_domain.columns
    }
    ev = FunctionalConfig(n_prompts=args.n_score, seed=1, batch_size=8)

    def domain_loss(_loaded: Any, config: Any) -> dict[str, float]:
        losses = domain_losses(loaded, config)
        return {**losses, "mean": float(np.mean(list(losses.values())))}

    rows: dict[str, Any] = {"baseline": domain_loss(loaded, ev)}
    for k in args.ks:
        dormant = top_heads(m["dormancy"], k)
        reader = top_heads(m["sink_read"], k)
        with ha.ablate(loaded, dormant):
            rows[f"top{k}_dormant"] = {"heads": dormant, "loss": domain_loss(loaded, ev)}
        with ha.ablate(loaded, reader):
            rows[f"top{k}_sink_read"] = {"heads": reader, "loss": domain_loss(loaded, ev)}
        losses = []
        for seed in range(args.seeds):
            with ha.ablate(loaded, random_heads(info.n_layers, info.n_heads, k, seed)):
                losses.append(domain_loss(loaded, ev))
        rows[f"random{k}"] = {
            "losses": losses,
            **{
                f"{d}_{stat}": float(fn([x[d] for x in losses]))
                for d in losses[0]
                for stat, fn in (("mean", np.mean), ("std", np.std))
            },
        }
    first = table.groupby(["layer", "head"])["first_token"].mean().to_numpy()  # domains weigh alike
    sink = first >= 0.6
    dormancy, read = m["dormancy"].reshape(-1), m["sink_read"].reshape(-1)
    return {
        "score_s": round(score_s, 1),
        "dormant_heads": int((m["dormancy"] >= 0.5).sum()),
        "first_token_readers": int((m["sink_read"] >= 0.5).sum()),
        "sink_heads": int(sink.sum()),
        "sink_heads_dormant": int((sink & (dormancy >= 0.5)).sum()),
        "sink_heads_reading": int((sink & (read >= 0.5)).sum()),
        "sink_heads_median_sink_value_norm": float(np.median(m["sink_value_norm"].reshape(-1)[sink])),
        "other_heads_median_sink_value_norm": float(np.median(m["sink_value_norm"].reshape(-1)[~sink])),
        "active_dormant_heads": [f"L{la}H{h}" for la, h in active_dormant.index],
        "domains": domains,
        "top_sink_read": [
            {"head": h, "sink_read": float(m["sink_read"].reshape(-1)[i])}
            for h, i in _top_with_index(m["sink_read"], 5)
        ],
        "mean_sink_value_norm": float(np.nanmean(m["sink_value_norm"])),
        "eval": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("negative", "semantic", "dormant"), required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--n-score", type=int, default=None, help="questions / sentences / sequences scored")
    parser.add_argument("--n-eval", type=int, default=160, help="held-out yes/no questions (negative)")
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--factors", type=float, nargs="+", default=[0.5, 2.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet()
    import headatlas as ha

    loaded = ha.load(args.model)
    start = time.perf_counter()
    body = {"negative": part_negative, "semantic": part_semantic, "dormant": part_dormant}[args.part](
        loaded, args
    )
    out = {
        "part": args.part,
        "model": loaded.info.name,
        "n_layers": loaded.info.n_layers,
        "n_heads": loaded.info.n_heads,
        "args": vars(args),
        "cpu": cpu_model(),
        "torch_threads": 1,
        "wall_s": round(time.perf_counter() - start, 1),
        "date": time.strftime("%Y-%m-%d"),
        **body,
    }
    OUT.mkdir(exist_ok=True)
    name = args.model.replace("/", "_")
    path = OUT / f"heads-more-{args.part}-{name}.json"
    text = strict_json(out, indent=2)
    path.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
