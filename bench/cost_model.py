"""A cost model of a scan and of ablation importance, fitted to this machine's measurements.

Per token, a scan of sequences of T tokens costs

    t_token(T) = 2 · P_body / R_body  +  2 · L · H · d · T / R_attn

where P_body is the transformer body's parameter count (no embedding, no LM head), L × H × d the
layers × query heads × head size, and R_body, R_attn the effective FLOP/s of the body's matmuls
and of attention *including* everything the scan adds to it (the log-sum-exp reads, the 64-offset
band, the second fused call for entropy). 2·P is the forward FLOPs per token of the matmuls;
2·L·H·d·T is causal attention's (QK and PV, each 2·d FLOPs per key, T/2 keys on average). The two
rates are fitted by least squares to scans measured at several T (``bench_capture.py --json``
cells of the default model, ``sdpa_body`` and ``scan`` runs), then the model predicts other
models and machines as ``t × (this machine's rate / that machine's rate)``.

Ablation importance runs ``heads + 1`` full forwards (LM head included) per held-out batch.

Usage::

    .venv/bin/python bench/cost_model.py --capture /tmp/bench_capture_long.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

# Shapes: (layers, query heads, head dim, body params, all params). Body = total - embedding - head.
SHAPES = {
    "SmolLM2-135M (default)": (30, 9, 64, 106.2e6, 134.5e6),
    "Qwen2.5-0.5B": (24, 14, 64, 357.9e6, 494.0e6),
    "Llama-2-7B": (32, 32, 128, 6.48e9, 6.74e9),
    "Llama-2-70B": (80, 64, 128, 68.45e9, 68.98e9),
}
DEFAULT = "SmolLM2-135M (default)"


def fit(cells: list[dict], run: str) -> tuple[float, float, list[tuple[int, float, float]]]:  # type: ignore[type-arg]
    """Fit ``t_token = a + b·T`` to the ``run`` medians of the default model's cells; return
    (R_body, R_attn, [(T, measured s/token, fitted s/token)])."""
    layers, heads, dim, body, _ = SHAPES[DEFAULT]
    rows = [
        (c["seq_len"], c["runs"][run]["median_s"] / (c["seq_len"] * c["batch_size"]))
        for c in cells
        if c["model"] == "default" and "median_s" in c["runs"].get(run, {})
    ]
    if len(rows) < 2:
        raise SystemExit(f"need {run} at two or more sequence lengths of the default model")
    t = np.array([r[0] for r in rows], dtype=float)
    y = np.array([r[1] for r in rows])
    a, b = np.linalg.lstsq(np.stack([np.ones_like(t), t], 1), y, rcond=None)[0]
    r_body = 2 * body / a
    r_attn = 2 * layers * heads * dim / b
    return r_body, r_attn, [(int(ti), yi, a + b * ti) for ti, yi in zip(t, y, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", required=True, help="bench_capture.py --json output")
    parser.add_argument(
        "--tokens", type=int, default=32_768, help="tokens scanned (README default: 64 × 256 × 2)"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heldout-tokens", type=int, default=4 * 128, help="importance: tokens per forward")
    parser.add_argument(
        "--node-tflops",
        default="3,400",
        help="effective dense TFLOP/s of a target node, comma-separated (default: a 64-core CPU server "
        "~3, an 8-GPU node ~400)",
    )
    args = parser.parse_args()
    with open(args.capture) as fh:
        cells = json.load(fh)["cells"]
    r_body, r_attn, rows = fit(cells, "scan")
    b_body, b_attn, _ = fit(cells, "sdpa_body")
    print(f"fit on this machine: R_body {r_body / 1e9:.1f} GFLOP/s, R_attn {r_attn / 1e9:.1f} GFLOP/s (scan)")
    print(
        f"                     R_body {b_body / 1e9:.1f} GFLOP/s, R_attn {b_attn / 1e9:.1f} GFLOP/s (plain body forward)"
    )
    for seq_len, measured, fitted in rows:
        print(f"  T = {seq_len:5d}: measured {measured * 1e3:6.2f} ms/token, model {fitted * 1e3:6.2f}")
    nodes = [float(x) for x in args.node_tflops.split(",")]
    speedups = [n * 1e12 / r_body for n in nodes]
    print(
        f"\n{args.tokens:,} tokens at T = {args.seq_len} (scan); ablation importance over "
        f"{args.heldout_tokens} held-out tokens per forward; target nodes "
        + ", ".join(f"{n:g} TFLOP/s ({x:,.0f}× here)" for n, x in zip(nodes, speedups, strict=True))
    )
    header = ["model", "scan here", *(f"scan {n:g}T" for n in nodes), "importance here"]
    header += [f"importance {n:g}T" for n in nodes]
    print(" | ".join(header))
    for name, (layers, heads, dim, body, total) in SHAPES.items():
        per_token = 2 * body / r_body + 2 * layers * heads * dim * args.seq_len / r_attn
        scan_s = args.tokens * per_token
        forward_token = 2 * total / r_body + 2 * layers * heads * dim * args.seq_len / b_attn
        importance_s = (layers * heads + 1) * args.heldout_tokens * forward_token
        cells = [name, _human(scan_s), *(_human(scan_s / x) for x in speedups), _human(importance_s)]
        cells += [_human(importance_s / x) for x in speedups]
        print(" | ".join(cells))
    print("N nodes: divide by N (shards are independent) and add each worker's model load once.")


def _human(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


if __name__ == "__main__":
    main()
