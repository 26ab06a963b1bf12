"""The conformance sweep's cost and counts: every family (or ``--families``, or ``--representative``:
the subset ``make test`` re-checks) built tiny and checked, with the wall time of the whole run and
of each family, the counts by category, and the goal's ratio (causal families through transformers'
attention interface that are exact on the fast path).

    .venv/bin/python bench/bench_conformance.py --json bench/results/conformance.json
    .venv/bin/python bench/bench_conformance.py --representative --json bench/results/conformance-representative.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from headatlas.apps.conformance import by_name, rows_json, sweep
from headatlas.apps.conformance.families import REPRESENTATIVE, families
from headatlas.cli.conformance import _versions, all_checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated model_types (default: every family)")
    parser.add_argument("--representative", action="store_true", help="only the subset make test re-checks")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds one family may take")
    parser.add_argument("--json", type=Path, help="write every row and the totals here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    if args.representative:
        wanted = set(REPRESENTATIVE)
        chosen = [f for f in families() if (f.kind, f.name) in wanted]
    elif args.families:
        chosen = by_name(args.families.split(","))
    else:
        chosen = None
    started = time.perf_counter()
    rows = sweep(chosen, all_checks(), limit=args.limit)
    wall = time.perf_counter() - started
    result = rows_json(rows, _versions())
    result["wall_seconds"] = round(wall, 1)
    result["torch_threads"] = 1
    print(json.dumps({k: result[k] for k in ("counts", "goal", "wall_seconds")}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
