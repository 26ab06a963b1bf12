"""ITI on TruthfulQA (Li et al. 2023; Lin et al. 2022): baseline, ITI at the (α, K) chosen on the
training halves, and random heads at the same K and α, with 95 % bootstrap intervals and the CE /
KL cost, through ``headatlas.steer.truthfulqa``.

Writes every number, the wall times and the machine to ``--out`` (JSON) and prints the table.
``--checkpoint DIR`` keeps each finished stage (the unsteered pass over all questions, then each
split), so a run that stops resumes where it was; ``--count N`` takes the first N questions (a quick
check). ``--splits 0-0,1-1`` computes only those (seed, fold) splits into the checkpoint, so
processes given disjoint splits share a run; a last call without it gathers them. Usage::

    .venv/bin/python bench/bench_truthfulqa.py --model default --alphas 0,5,15 --ks 16 --rotate \\
        --checkpoint /tmp/tqa-default --out bench/results/truthfulqa-default.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchlib import cpu_model, maxrss_mib, quiet, usable_cores

HERE = Path(__file__).resolve().parent


def _numbers(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def _subset(csv: Path, count: int | None) -> Path:
    """The first ``count`` questions of ``csv`` as a temporary CSV (``csv`` itself when ``None``)."""
    if count is None:
        return csv
    import pandas as pd

    out = Path(tempfile.mkdtemp()) / f"TruthfulQA-first{count}.csv"
    pd.read_csv(csv).head(count).to_csv(out, index=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--csv", type=Path, default=HERE / "data" / "TruthfulQA.csv")
    parser.add_argument("--alphas", default="0,5,10,15")
    parser.add_argument("--ks", default="8,16,32")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--val-share", type=float, default=0.2)
    parser.add_argument("--n-text", type=int, default=32, help="EWT test sentences for CE / KL")
    parser.add_argument("--rotate", action="store_true", help="score each question's ITI in one seed only")
    parser.add_argument("--count", type=int, default=None, help="first N questions only (quick check)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="directory of finished stages (resume)")
    parser.add_argument(
        "--splits", default=None, help="SEED-FOLD pairs to compute, e.g. 0-0,1-1 (share a run)"
    )
    parser.add_argument("--batch-tokens", type=int, default=256, help="packed tokens per forward pass")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default=None, help="how the run was made (written to the JSON)")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write")
    parser.add_argument("--figure", type=Path, default=None, help="PNG to write (validation sweep, test MC)")
    args = parser.parse_args()
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    import headatlas as ha
    from headatlas.apps.steer.tqa import parse_splits, summary_table, truthfulqa_figure

    start = time.perf_counter()
    loaded = ha.load(args.model)
    load_s = time.perf_counter() - start
    stages: dict[str, float] = {}

    def progress(label: str, done: int, total: int) -> None:
        if done == total:
            stages[label] = round(time.perf_counter() - start, 1)
            print(f"[{stages[label]:7.1f} s] {label}: {done}/{total}", flush=True)

    result = ha.steer.truthfulqa(
        loaded,
        _subset(args.csv, args.count),
        alphas=_numbers(args.alphas, float),
        ks=_numbers(args.ks, int),
        n_folds=args.folds,
        seeds=args.seeds,
        val_share=args.val_share,
        n_text=args.n_text,
        rotate=args.rotate,
        checkpoint=args.checkpoint,
        batch_tokens=args.batch_tokens,
        progress=progress,
        splits=parse_splits(args.splits) if args.splits else None,
    )
    wall = time.perf_counter() - start
    table = summary_table(result.summary)
    print(table.to_string(index=False))
    summary = dict(result.summary)
    summary["csv"] = {
        **summary["csv"],
        "path": str(args.csv.name if args.count is None else summary["csv"]["path"]),
    }
    summary["bench"] = {
        "command": "bench/bench_truthfulqa.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if v not in (None, False) and k not in ("out", "figure", "note")
        ),
        "load_seconds": round(load_s, 1),
        "wall_seconds": round(wall, 1),
        "stage_finished_at_seconds": stages,
        "peak_rss_mib": round(maxrss_mib(), 1),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "notes": args.note,
    }
    summary["table"] = table.to_dict("records")
    print(f"wall {wall:.0f} s (load {load_s:.0f} s)")
    if args.figure:
        truthfulqa_figure(result.summary, f"{loaded.info.name}: ITI on TruthfulQA", args.figure)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        print(f"→ {args.out}")


if __name__ == "__main__":
    main()
