"""The 1.5B rows: what a full atlas of Qwen2.5-Coder-1.5B-Instruct costs, and what it finds next to
the papers' own numbers. Run in stages, each writing into one results JSON (stages already in the
file are kept), because the whole takes more than an hour on two cores:

- ``atlas``: read a finished atlas (``headatlas scan qwen2.5-coder-1.5b --probes ... --out DIR``,
  run under ``/usr/bin/time -v`` with its output in ``--time-log``): the cost of every battery
  (wall seconds, tokens/s, the scan's peak RSS when the battery finished, recorded in
  ``atlas.json``), the whole run's wall time and peak RSS, and the heads it finds against the
  papers: the retrieval heads' share (Wu et al. 2024: under 5 %), successor heads (Gould et al.
  2023), the strongest copy-suppression head (McDougall et al. 2023), the depth of induction heads.
- ``verify``: read ``DIR/verify-<score>.json`` written by ``headatlas verify`` (top-k against k
  random heads, each on its own task).
- ``dtype``: the natural battery (8 × 256 tokens) at float32 and bfloat16 in one process: wall
  seconds of each, and how far bfloat16's scores are from float32's (largest absolute difference,
  Spearman over heads).

The scan ÷ plain-forward ratios at T = 1024 and 4096 come from ``bench/bench_capture.py --models
qwen2.5-coder-1.5b`` (its own JSON).

Usage::

    .venv/bin/python bench/bench_large.py atlas --atlas DIR --time-log scan.time --json results/large.json
    .venv/bin/python bench/bench_large.py verify --atlas DIR --json results/large.json
    .venv/bin/python bench/bench_large.py dtype --json results/large.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import cpu_model, maxrss_mib, quiet

MODEL = "qwen2.5-coder-1.5b"
RETRIEVAL_ROLE = 0.1
"""The ``retrieval`` role's threshold (a head copies the needle in more than 10 % of decoding steps)."""


def _time_log(path: Path | None) -> dict[str, Any]:
    """Wall seconds and peak RSS of a run from ``/usr/bin/time -v``'s report, if given."""
    if path is None or not path.exists():
        return {}
    text = path.read_text(errors="replace")
    out: dict[str, Any] = {}
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if rss:
        out["peak_rss_gib"] = round(int(rss.group(1)) / 2**20, 2)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if wall:
        parts = [float(p) for p in wall.group(1).split(":")]
        out["wall_seconds"] = round(sum(p * 60**i for i, p in enumerate(reversed(parts))), 1)
    return out


def _heads(table: Any, score: str, k: int = 5, lowest: bool = False) -> list[list[Any]]:
    rows = table.sort_values(score, ascending=lowest).head(k)
    return [[f"L{int(r.layer)}H{int(r.head)}", round(float(getattr(r, score)), 3)] for r in rows.itertuples()]


def _findings(atlas: Any) -> dict[str, Any]:
    """The heads the papers describe, on their own definitions, from one atlas."""
    import numpy as np

    table = atlas.table
    n = len(table)
    n_layers = atlas.model.n_layers
    found: dict[str, Any] = {"heads": n}
    if "retrieval" in table:
        share = float((table["retrieval"] > RETRIEVAL_ROLE).mean())
        found["retrieval"] = {"heads_over_0.1": int((table["retrieval"] > RETRIEVAL_ROLE).sum()),
                              "share": round(share, 4), "paper": "Wu et al. 2024: under 5 %",
                              "top": _heads(table, "retrieval")}  # fmt: skip
    if "successor" in table:
        holders = atlas.with_role("successor")
        found["successor"] = {"heads_with_role": len(holders), "top": _heads(table, "successor"),
                              "paper": "Gould et al. 2023: successor heads from 31M to 12B"}  # fmt: skip
    if "copying" in table:
        found["copy_suppression"] = {"strongest": _heads(table, "copying", 3, lowest=True),
                                     "copying_top": _heads(table, "copying", 3),
                                     "paper": "McDougall et al. 2023: GPT-2 small L10H7"}  # fmt: skip
    if "induction" in table:
        induction = atlas.with_role("induction")
        depth = (induction["layer"].to_numpy() + 0.5) / n_layers
        found["induction"] = {
            "heads_with_role": len(induction),
            "relative_depth_quartiles": [round(float(q), 3) for q in np.quantile(depth, [0.25, 0.5, 0.75])]
            if len(depth)
            else None,
            "top": _heads(table, "induction"),
        }
    roles: dict[str, int] = {}
    for held in table["roles"].fillna(""):
        for role in str(held).split(","):
            if role:
                roles[role] = roles.get(role, 0) + 1
    found["roles"] = roles
    return found


def stage_atlas(args: argparse.Namespace) -> dict[str, Any]:
    import headatlas as ha

    atlas = ha.Atlas.load(args.atlas)
    meta = atlas.meta
    batteries = {
        name: {k: params.get(k) for k in ("seconds", "tokens", "tokens_per_second", "peak_rss_mib")}
        for name, params in meta.get("batteries", {}).items()
    }
    return {
        "atlas": str(args.atlas),
        "model": atlas.model.to_dict(),
        "probes": meta.get("probes"),
        "wall_seconds_in_scan": meta.get("wall_seconds"),
        "tokens": meta.get("tokens"),
        "batteries": batteries,
        "run": _time_log(args.time_log),
        "findings": _findings(atlas),
    }


def stage_verify(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for path in sorted(Path(args.atlas).glob("verify-*.json")):
        out[path.stem.removeprefix("verify-")] = json.loads(path.read_text())
    return out


def stage_dtype(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    import headatlas as ha

    quiet()
    rows: dict[str, Any] = {}
    atlases = {}
    for dtype in ("float32", "bfloat16"):
        loaded = ha.load(MODEL, dtype=dtype)
        ha.scan(loaded, probes=["natural"], n_prompts=2, seq_len=64)  # warm-up
        start = time.perf_counter()
        atlases[dtype] = ha.scan(loaded, probes=["natural"], n_prompts=args.n_prompts, seq_len=args.seq_len)
        rows[dtype] = {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": round(maxrss_mib())}
        del loaded
    a, b = atlases["float32"], atlases["bfloat16"]
    diff = {}
    for score in a.scores:
        x, y = a.matrix(score).ravel(), b.matrix(score).ravel()
        ok = np.isfinite(x) & np.isfinite(y)
        rho = pd.Series(x[ok]).rank().corr(pd.Series(y[ok]).rank())
        diff[score] = {
            "max_abs": round(float(np.abs(x[ok] - y[ok]).max()), 5),
            "spearman": round(float(rho), 5),
        }
    rows["bfloat16_vs_float32"] = diff
    rows["speedup_bfloat16"] = round(rows["float32"]["seconds"] / rows["bfloat16"]["seconds"], 3)
    rows["battery"] = f"natural, {args.n_prompts} × {args.seq_len} tokens"
    return rows


STAGES = {"atlas": stage_atlas, "verify": stage_verify, "dtype": stage_dtype}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--atlas", type=Path, default=None, help="the 1.5B atlas directory (atlas, verify)")
    parser.add_argument("--time-log", type=Path, default=None, help="/usr/bin/time -v output of the scan")
    parser.add_argument("--n-prompts", type=int, default=8, help="dtype: sequences (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="dtype: tokens each (default: %(default)s)")
    parser.add_argument("--json", type=Path, required=True, help="results JSON (stages are merged into it)")
    args = parser.parse_args(argv)
    if args.stage in ("atlas", "verify") and args.atlas is None:
        parser.error(f"the {args.stage} stage reads --atlas DIR")
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    results[args.stage] = STAGES[args.stage](args)
    results.setdefault("machine", {"cpu": cpu_model(), "python": sys.version.split()[0]})
    results.setdefault("dates", {})[args.stage] = dt.date.today().isoformat()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results[args.stage], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
