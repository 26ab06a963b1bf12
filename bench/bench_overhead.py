"""Where the scan's time goes beyond the body forward, on one batch, in one run.

Runs, interleaved round-robin after a warm-up, best of ``--repeats``:

- ``body``: the transformer body alone (``model.base_model``), SDPA, no grad: the limit;
- ``scan``: ``run_scan`` of the natural battery on the same batch (every natural-battery score);
- ``scan, no entropy``: the same with the entropy read (the second fused call, ``A·K``) replaced by
  zeros: what that call costs;
- ``scan, band rows R``: the scan with the 64-offset band computed ``R`` query rows at a time.

Also times one layer's fused attention two ways: the output and the ``A·K`` call separately, and
one call with V ‖ K (Q, K zero-padded to twice the head size), and checks they are bitwise equal.
Usage::

    .venv/bin/python bench/bench_overhead.py --seq-len 1024 --batch-size 4
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from benchlib import cpu_model, quiet


def _fused_attention_sharing(batch: int, heads: int, seq_len: int, dim: int) -> None:
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq_len, dim, generator=gen) for _ in range(3))
    scale = dim**-0.5

    def two_calls() -> tuple[torch.Tensor, ...]:
        out, lse = flash(q, k, v, 0.0, True, scale=scale)[:2]
        return out, lse, flash(q, k, k, 0.0, True, scale=scale)[0]

    def one_call() -> tuple[torch.Tensor, ...]:
        pad = torch.zeros_like(q)
        both, lse = flash(
            torch.cat([q, pad], -1), torch.cat([k, pad], -1), torch.cat([v, k], -1), 0.0, True, scale=scale
        )[:2]
        return both[..., :dim], lse, both[..., dim:]

    times = {}
    for name, fn in (("two calls", two_calls), ("one padded call", one_call)):
        fn()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        times[name] = (time.perf_counter() - start) / 5
    equal = all(torch.equal(a, b) for a, b in zip(two_calls(), one_call(), strict=True))
    print(
        f"one layer's fused attention, {batch}×{heads}×{seq_len}×{dim}: two calls "
        f"{times['two calls']:.3f} s, one padded call {times['one padded call']:.3f} s; bitwise equal: {equal}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--band-rows", default="32,256", help="other band row blocks to try")
    args = parser.parse_args()
    quiet()
    import headatlas as ha
    from headatlas.capture import views
    from headatlas.scanning.config import ScanConfig
    from headatlas.scanning.scan import build_batteries
    from headatlas.scanning.stream import run_scan

    loaded = ha.load(args.model)
    batteries = build_batteries(
        loaded, ScanConfig.of(["natural"], n_prompts=args.batch_size, seq_len=args.seq_len, seed=0)
    )
    ids = torch.stack([torch.tensor(s.ids) for s in batteries[0].sequences])  # [batch, seq]

    def body() -> None:
        loaded.model.set_attn_implementation("sdpa")
        with torch.no_grad():
            loaded.model.base_model(input_ids=ids)

    def scan() -> None:
        run_scan(loaded, batteries, args.batch_size)

    def patched(attr: str, owner: object, value: object) -> Callable[[], None]:
        def run() -> None:
            original = getattr(owner, attr)
            setattr(owner, attr, value)
            try:
                scan()
            finally:
                setattr(owner, attr, original)

        return run

    runs: dict[str, Callable[[], None]] = {
        "body": body,
        "scan": scan,
        "scan, no entropy": patched("entropy", views.LseView, lambda self: torch.zeros_like(self.lse)),
    }
    for rows in (int(r) for r in args.band_rows.split(",") if r):
        runs[f"scan, band rows {rows}"] = patched("BAND_ROWS", views, rows)
    body()
    scan()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = min(times["body"])
    print(
        f"{loaded.info.name}, {args.batch_size} × {args.seq_len} tokens, {cpu_model()}, best of {args.repeats}"
    )
    for name, values in times.items():
        print(f"  {name:<22} {min(values):7.2f} s  {min(values) / base:5.2f}× body   {values}")
    info = loaded.info
    _fused_attention_sharing(args.batch_size, info.n_heads, args.seq_len, info.head_dim)


if __name__ == "__main__":
    main()
