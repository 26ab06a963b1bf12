"""Decode speed of a head-wise KV plan against the plain cache, in one run, rounds interleaved.

``bench_kv.py`` times decoding on the answers themselves (8–12 tokens, stopped as soon as the
answer is there), which at 1024 tokens is within the noise of one run. This script times only
decoding: per length, one niah prompt is prefilled once into transformers' ``DynamicCache``; each
round then decodes exactly ``--new`` tokens (greedy, no early stop) from a copy of that cache
(``full``) and from the plan's compressed cache (``plan``, ``kv.compressed(source=...)``: what
the accuracy rows used), alternating the order. It prints the median ms per token of each, the
ratio full / plan (> 1: the plan decodes faster), and the KV bytes each holds after prefill
(``cache.nbytes``: tensors, not a formula). Then, once per length, the peak RSS of one decode of
``--new`` tokens from each cache alone: first from the prefilled plain cache itself (no copy),
then, after that cache is cropped back, compressed into the plan's cache and released
(``malloc_trim`` hands the freed pages back), from the plan's cache. The difference of the two
peaks is what the plan saves during decode, to set beside the bytes it frees. Usage::

    .venv/bin/python bench/bench_kv_decode.py --plan bench/results/kv-fit-plan-default-answer.json \\
        --lengths 1024,4096 --new 64 --rounds 5 --json bench/results/kv-decode-default.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import statistics
import time
from typing import Any

import torch

from benchlib import cpu_model, current_rss_mib, peak_since_reset_mib, quiet, reset_peak_rss, usable_cores
from headatlas.model.compat import cache_kwargs


def _time_decode(loaded: Any, ids: torch.Tensor, cache: Any, new: int) -> float:
    """Return ms per token of decoding exactly ``new`` tokens greedily after ``ids`` from ``cache``."""
    start = time.perf_counter()
    loaded.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        **cache_kwargs(loaded.model, cache),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=loaded.tokenizer.eos_token_id,
    )
    return 1000 * (time.perf_counter() - start) / new


def _release() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that
    RSS drops by what was freed; a no-op where there is no glibc."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _decode_memory(
    loaded: Any, kv: Any, plan: Any, ids: torch.Tensor, plain: Any, new: int
) -> dict[str, Any]:
    """Peak RSS (MiB) of one decode of ``new`` tokens from ``plain`` alone, then from the plan's
    cache alone (``plain`` is emptied: the caller must not use it afterwards); the RSS each decode
    started from and the difference of the peaks (full − plan)."""
    out: dict[str, Any] = {}
    _release()
    out["rss_before_full_mib"] = current_rss_mib()
    reset_peak_rss()
    with torch.no_grad():
        _time_decode(loaded, ids, plain, new)
    out["peak_full_mib"] = peak_since_reset_mib()
    extra = plain.get_seq_length() - (ids.shape[1] - 1)  # prefill ran all but the prompt's last token
    if extra > 0:
        plain.crop(-extra)  # transformers' crop takes the tokens to drop as a negative count
    with kv.compressed(loaded, plan, source=plain) as cache, torch.no_grad():
        plain.layers.clear()  # the full cache's tensors go; only the plan's cache is held
        _release()
        out["rss_before_plan_mib"] = current_rss_mib()
        reset_peak_rss()
        _time_decode(loaded, ids, cache, new)
        out["peak_plan_mib"] = peak_since_reset_mib()
    out["peak_saved_mib"] = round(out["peak_full_mib"] - out["peak_plan_mib"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--plan", required=True, help="plan JSON (e.g. from `headatlas kv fit`)")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--new", type=int, default=64, help="tokens decoded per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    from transformers import DynamicCache

    import headatlas as ha
    from headatlas.apps import kv
    from headatlas.apps.kv.cache import layer_nbytes
    from headatlas.apps.kv.evaluate import encode
    from headatlas.apps.kv.tasks import make_samples

    loaded = ha.load(args.model)
    plan = kv.Plan.load(args.plan)
    out: dict[str, Any] = {
        "model": loaded.info.name, "plan": args.plan, "new_tokens": args.new, "rounds": args.rounds,
        "threads": args.threads, "cpu": cpu_model(), "cores": usable_cores(), "lengths": {},
    }  # fmt: skip
    print(
        "| prompt tokens | KV MiB full / plan | decode ms/token full | plan | full / plan | decode peak MiB full / plan |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for length in [int(x) for x in args.lengths.split(",")]:
        ids = encode(loaded.tokenizer, make_samples(loaded.tokenizer, "niah", length, 1, seed=0)[0])
        with torch.no_grad():
            plain = DynamicCache(config=loaded.model.config)
            kv.prefill(loaded, plain, ids, chunk=ids.shape[1])
        held = {"full": sum(layer_nbytes(layer) for layer in plain.layers)}
        times: dict[str, list[float]] = {"full": [], "plan": []}
        for r in range(args.rounds + 1):  # round 0 warms up and is not counted
            for label in ("full", "plan") if r % 2 == 0 else ("plan", "full"):
                ctx: Any = (
                    contextlib.nullcontext(copy.deepcopy(plain))
                    if label == "full"
                    else kv.compressed(loaded, plan, source=plain)
                )
                with ctx as cache, torch.no_grad():
                    if label == "plan":
                        held["plan"] = sum(layer_nbytes(layer) for layer in cache.layers)
                    ms = _time_decode(loaded, ids, cache, args.new)
                if r > 0:
                    times[label].append(ms)
        full_ms, plan_ms = statistics.median(times["full"]), statistics.median(times["plan"])
        out["lengths"][str(ids.shape[1])] = {
            "kv_mib": {k: round(v / 2**20, 3) for k, v in held.items()},
            "decode_ms": {"full": round(full_ms, 2), "plan": round(plan_ms, 2)},
            "rounds_ms": {k: [round(t, 2) for t in v] for k, v in times.items()},
            "speedup": round(full_ms / plan_ms, 3),
            "freed_mib": round((held["full"] - held["plan"]) / 2**20, 3),
            "decode_memory": _decode_memory(loaded, kv, plan, ids, plain, args.new),
        }
        memory = out["lengths"][str(ids.shape[1])]["decode_memory"]
        print(
            f"| {ids.shape[1]} | {held['full'] / 2**20:.1f} / {held['plan'] / 2**20:.1f} | {full_ms:.1f} | "
            f"{plan_ms:.1f} | {full_ms / plan_ms:.2f}× | {memory['peak_full_mib']:.0f} / {memory['peak_plan_mib']:.0f} |",
            flush=True,
        )
        del plain
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
