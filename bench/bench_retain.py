"""Continual learning with SEEKR (He et al. 2024) through ``headatlas.apps.retain``: a sequence of
word-list generation tasks learned one after another by the default model, under plain
fine-tuning, replay only, and replay + SEEKR attention distillation on the top-K heads (and, as a
control, K random heads), at several replay fractions and seeds.

The first task is learned once per seed (plain fine-tuning, the same for every condition); each
condition then starts from that checkpoint and learns the remaining tasks in order. After every
stage it measures greedy exact-match accuracy on every task. Earlier tasks are scored on their
items outside the largest replay set of that seed, so replayed items never count and every
condition is scored on the same items. Writes every number and wall time to ``--out`` (JSON) and
prints the table. Usage::

    nice -n 10 .venv/bin/python bench/bench_retain.py --seeds 0,1,2 --out bench/results/retain-default.json
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import random
import re
import statistics
import time
from pathlib import Path

import torch

from benchlib import cpu_model, quiet, strict_json

CONDITIONS = ("plain", "replay", "seekr", "random")


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)


def run_condition(loaded, tasks, held, replays, condition, fraction, args, seed) -> list[dict]:  # type: ignore[no-untyped-def]
    """Learn tasks[1:] in order under ``condition``; return one record per stage."""
    import numpy as np

    from headatlas.apps.retain import RetainConfig, accuracy, retain
    from headatlas.apps.retain.seekr import top_heads
    from headatlas.core.heads import head_name

    names = list(tasks)
    stages = []
    for t, name in enumerate(names[1:], start=1):
        replay = [] if condition == "plain" else [x for prev in names[:t] for x in replays[fraction][prev]]
        heads = {"plain": "none", "replay": "none", "seekr": "seekr"}.get(condition)
        if condition == "random":  # the control: K heads drawn uniformly, the same loss
            scores = np.random.default_rng(seed * 100 + t).random((loaded.info.n_layers, loaded.info.n_heads))
            heads = ",".join(head_name(layer, head) for layer, head in top_heads(scores, args.k))
        config = RetainConfig(
            heads=str(heads),
            k=args.k,
            lam=args.lam,
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            replay_batch=args.batch_size,
            probe_steps=args.probe_steps,
            seed=seed * 100 + t,
        )
        result = retain(loaded, tasks[name], replay, config)
        acc = {n: accuracy(loaded, held[n] if i < t else tasks[n]) for i, n in enumerate(names)}
        stages.append(
            {"stage": t, "task": name, "accuracy": acc, "result": {**result.to_dict(), "importance": None}}
        )
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tasks", default="capitals,antonyms,french")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.01,0.1")
    parser.add_argument("--conditions", default="plain,replay,seekr,random")
    parser.add_argument("--steps", type=int, default=15, help="optimizer steps per task")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=24, help="heads distilled")
    parser.add_argument("--lam", type=float, default=1.0, help="weight of the attention-distillation loss")
    parser.add_argument("--probe-steps", type=int, default=2)
    parser.add_argument(
        "--random-fractions", default="0.01", help="replay fractions of the random-head control"
    )
    parser.add_argument(
        "--merge", type=Path, nargs="*", default=None, help="merge these result files into --out"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    quiet()
    torch.set_num_threads(args.threads)
    import headatlas as ha
    from headatlas.apps.retain import RetainConfig, accuracy, builtin_task, replay_subset, retain
    from headatlas.apps.retain.training import trainable_parameters

    started = time.perf_counter()
    cpu_started = time.process_time()
    loaded = ha.load(args.model)
    params = trainable_parameters(loaded, "attention")
    base = _snapshot(params)
    names = [n.strip() for n in args.tasks.split(",")]
    tasks = {n: builtin_task(n) for n in names}
    fractions = [float(f) for f in args.fractions.split(",")]
    conditions = [c.strip() for c in args.conditions.split(",")]
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        order = {n: random.Random(f"{seed}-{n}").sample(tasks[n], len(tasks[n])) for n in names}
        replays = {f: {n: replay_subset(order[n], f, 0) for n in names} for f in fractions}
        largest = {n: {(x.prompt, x.answer) for x in replays[max(fractions)][n]} for n in names}
        held = {n: [x for x in tasks[n] if (x.prompt, x.answer) not in largest[n]] for n in names}
        _restore(params, base)
        t0 = time.perf_counter()
        first = retain(
            loaded, tasks[names[0]], [], RetainConfig(heads="none", steps=args.steps, lr=args.lr, seed=seed)
        )
        after_first = _snapshot(params)
        acc0 = {n: accuracy(loaded, held[n] if i == 0 else tasks[n]) for i, n in enumerate(names)}
        print(
            f"seed {seed} stage 0 ({names[0]}): {acc0}  loss {first.loss_new:.3f}  {time.perf_counter() - t0:.0f} s"
        )
        for condition in conditions:
            chosen = (
                [float(f) for f in args.random_fractions.split(",")] if condition == "random" else fractions
            )
            for fraction in [None] if condition == "plain" else chosen:
                _restore(params, after_first)
                t0 = time.perf_counter()
                stages = run_condition(
                    loaded, tasks, held, replays, condition, fraction or fractions[0], args, seed
                )
                record = {
                    "seed": seed,
                    "condition": condition,
                    "fraction": fraction,
                    "stage0": acc0,
                    "stages": stages,
                }
                record["seconds"] = time.perf_counter() - t0
                runs.append(record)
                last = stages[-1]["accuracy"]
                print(
                    f"seed {seed} {condition:7s} {fraction!s:5s}: "
                    + "  ".join(f"{s['task']}→{s['accuracy']}" for s in stages)
                    + f"  {record['seconds']:.0f} s",
                    flush=True,
                )
                del last
    summary = summarise(runs, names)
    for row in summary:
        print(json.dumps(row))
    out = {
        "bench": "retain",
        "paper": "He et al. 2024, SEEKR (arXiv 2411.06171)",
        "model": loaded.info.name,
        "tasks": {n: len(tasks[n]) for n in names},
        "settings": vars(args) | {"out": str(args.out)},
        "summary": summary,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "machine": {"cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(strict_json(out, indent=1) + "\n")


LOG_LINE = re.compile(r"^seed (\d+) (\w+)\s+(None|[\d.]+)\s*: (.*?)\s+(\d+) s$")
STAGE = re.compile(r"(\w+)→(\{[^}]*\})")


def from_log(path: Path, tasks: dict[str, int]) -> dict:
    """Rebuild a result file's runs (accuracies and seconds only) from a run's printed log, for a run
    stopped before it wrote its JSON; every run so rebuilt says ``"source": "log"``."""
    runs = []
    for line in path.read_text().splitlines():
        found = LOG_LINE.match(line.strip())
        if not found or found.group(2) == "stage":
            continue
        seed, condition, fraction, body, seconds = found.groups()
        stages = [
            {"stage": i, "task": task, "accuracy": ast.literal_eval(acc)}
            for i, (task, acc) in enumerate(STAGE.findall(body), start=1)
        ]
        runs.append(
            {
                "seed": int(seed),
                "condition": condition,
                "fraction": None if fraction == "None" else float(fraction),
                "stages": stages,
                "seconds": float(seconds),
                "source": "log",
            }
        )
    return {
        "tasks": tasks,
        "runs": runs,
        "settings": {"seeds": str(runs[0]["seed"]) if runs else ""},
        "cpu_s": 0.0,
        "wall_s": 0.0,
    }


def merge(paths: list[Path], out: Path | None) -> None:
    """Join the runs of several result files (one per seed, run side by side) and re-summarise;
    a ``.log`` path is read with :func:`from_log`."""
    parts = [json.loads(Path(p).read_text()) for p in paths if Path(p).suffix != ".log"]
    tasks = parts[0]["tasks"] if parts else {"capitals": 40, "antonyms": 40, "french": 66}
    parts += [from_log(Path(p), tasks) for p in paths if Path(p).suffix == ".log"]
    runs = [run for part in parts for run in part["runs"]]
    names = list(parts[0]["tasks"])
    merged = {**parts[0], "runs": runs, "summary": summarise(runs, names)}
    merged["settings"] = {**parts[0]["settings"], "seeds": ",".join(p["settings"]["seeds"] for p in parts)}
    merged["cpu_s"] = sum(p["cpu_s"] for p in parts)
    merged["wall_s"] = max(p["wall_s"] for p in parts)
    merged["parts"] = [
        {"file": str(p), "cpu_s": q["cpu_s"], "wall_s": q["wall_s"]}
        for p, q in zip(paths, parts, strict=True)
    ]
    print(table(merged))
    if out:
        out.write_text(strict_json(merged, indent=1) + "\n")


def table(result: dict) -> str:
    """The measured table as Markdown: mean ± sd over seeds of each task's accuracy after each stage."""
    names = list(result["tasks"])

    def cell(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.2f} ± {sd:.2f}"

    head = ["condition", "replay"]
    for t in range(1, len(names)):
        head += [f"after {names[t]}: {n}" for n in names[: t + 1]]
        if t > 1:
            head.append(f"after {names[t]}: earlier mean")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    groups: dict[tuple[str, object], list[dict]] = {}
    for run in result["runs"]:
        groups.setdefault((run["condition"], run["fraction"]), []).append(run)
    for (condition, fraction), members in groups.items():
        row = [condition, "–" if fraction is None else f"{100 * fraction:g} %"]
        for t in range(1, len(names)):
            accs = [m["stages"][t - 1]["accuracy"] for m in members]
            row += [cell([a[n] for a in accs]) for n in names[: t + 1]]
            if t > 1:
                row.append(cell([statistics.fmean(a[n] for n in names[:t]) for a in accs]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summarise(runs: list[dict], names: list[str]) -> list[dict]:
    """Mean ± sd over seeds, per condition and replay fraction: each task's accuracy after the last
    stage, the mean accuracy of the earlier tasks after each stage, and the new task's accuracy."""
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["condition"], run["fraction"]), []).append(run)
    rows = []
    for (condition, fraction), members in groups.items():
        row: dict[str, object] = {"condition": condition, "fraction": fraction, "seeds": len(members)}
        for stage_index, stage in enumerate(members[0]["stages"]):
            t = stage["stage"]
            old = [
                statistics.fmean(m["stages"][stage_index]["accuracy"][n] for n in names[:t]) for m in members
            ]
            new = [m["stages"][stage_index]["accuracy"][names[t]] for m in members]
            row[f"after_{stage['task']}_old_mean"] = _mean_sd(old)
            row[f"after_{stage['task']}_new"] = _mean_sd(new)
        for n in names:
            row[f"final_{n}"] = _mean_sd([m["stages"][-1]["accuracy"][n] for m in members])
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
