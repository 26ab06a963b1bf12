"""Fit the guards headatlas ships for its packaged decoders: ``python tools/fit_packaged_guards.py``.

Each guard is fitted the way ``headatlas guard fit`` fits one (heads by Attention Tracker's rule
with the guard's automatic n, benign-calibrated threshold, head regression, residual probe) on the
rows named by ``--train`` (sources written for headatlas, so that every public labelled set stays a
test set), and written to ``src/headatlas/apps/guard/packaged/NAME.json``, where
:meth:`headatlas.Guard.packaged` and ``headatlas guard score MODEL`` (without ``--guard``) find it.
Regenerate on purpose, after a change to the features, the fitting or a packaged model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import headatlas as ha
from headatlas.apps.guard import synthetic_rows, tracker_rows
from headatlas.apps.guard.core import PACKAGED_GUARDS

OUT = Path(__file__).resolve().parent.parent / "src" / "headatlas" / "apps" / "guard" / "packaged"
SOURCES = {"synthetic": synthetic_rows, "tracker": tracker_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(PACKAGED_GUARDS))
    parser.add_argument("--train", default="synthetic,tracker", help=f"comma-separated: {', '.join(SOURCES)}")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    rows = [row for name in args.train.split(",") for row in SOURCES[name]()]
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        if name not in PACKAGED_GUARDS:
            raise SystemExit(f"{name} is not one of {PACKAGED_GUARDS}")
        started = time.perf_counter()
        guard = ha.Guard.fit(ha.load(name), rows, batch_size=args.batch_size)
        (OUT / f"{name}.json").write_text(json.dumps(guard.config, indent=1) + "\n")
        heads = guard.config["important_head_names"]
        print(
            f"{name}: {len(heads)} heads at n = {guard.config['n_sigma']:g}, threshold {guard.threshold:.4f}, "
            f"probe layer {guard.probe_layer}, {time.perf_counter() - started:.0f} s → {OUT / name}.json",
            flush=True,
        )


if __name__ == "__main__":
    main()
