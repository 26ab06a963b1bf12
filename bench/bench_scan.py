"""Benchmark a headatlas scan against plain forward passes of the same model on the same tokens.

Three run kinds, all over the batches of the ``natural`` battery (default: 64 prompts × 256 tokens
of the packaged default model, batch size 8):

- ``sdpa``: plain forward pass, ``set_attn_implementation("sdpa")``, no grad (the baseline);
- ``eager``: forward pass with ``set_attn_implementation("eager")`` and ``output_attentions=True``
  (how attention maps are usually extracted today);
- ``scan``: ``headatlas.scanning.stream.run_scan`` — headatlas capture plus every natural-battery score.

Timing (this process): one warm-up batch per kind, then ``--repeats`` full passes per kind,
interleaved round-robin (sdpa, eager, scan, sdpa, ...) so slow drift in background load hits every
kind alike; the median wall time (``time.perf_counter``) is reported.

Memory (one fresh subprocess per kind, this script re-invoked with ``--child KIND``, all spawned
before this process loads anything, since an exec'd child inherits its parent's ``ru_maxrss``): the
RSS right after the model is loaded and the battery built, then the peak RSS (``ru_maxrss``,
nothing subtracted) of a warm-up batch plus one full pass. On Linux the high-water mark is reset after
loading (``/proc/self/clear_refs``), because loading briefly holds far more than it keeps and would
otherwise hide the run's own peak; the load-time peak is reported separately. Every ratio is
computed from numbers measured in this invocation.

Usage: ``.venv/bin/python bench/bench_scan.py [--n-prompts 64 --seq-len 256 --repeats 3 ...]``
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from benchlib import cpu_model as _cpu_model
from benchlib import current_rss_mib as _current_rss_mib
from benchlib import maxrss_mib as _maxrss_mib
from benchlib import quiet as _quiet
from benchlib import reset_peak_rss as _reset_peak_rss
from benchlib import status_mib as _proc_status_mib
from benchlib import usable_cores

KINDS = ("sdpa", "eager", "scan")
CHILD_MARKER = "BENCH_CHILD_RESULT "


def _machine(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    usable = usable_cores()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": threads,
    }


def _setup(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """Load the model and build the natural battery; return ``(loaded, battery, batches)``."""
    import torch

    import headatlas
    from headatlas.batteries.base import make_batch, pad_id
    from headatlas.scanning.config import ScanConfig
    from headatlas.scanning.scan import build_batteries

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = headatlas.load(args.model)
    (battery,) = build_batteries(
        loaded, ScanConfig.of(["natural"], n_prompts=args.n_prompts, seq_len=args.seq_len, seed=args.seed)
    )
    pad = pad_id(loaded.tokenizer)
    seqs = battery.sequences
    batches = [make_batch(seqs[i : i + args.batch_size], pad) for i in range(0, len(seqs), args.batch_size)]
    return loaded, battery, batches


def _runners(
    loaded: Any, battery: Any, batches: list[Any], batch_size: int
) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """Return ``{kind: (warm_up, full_pass)}``; each call restores the attention backend it needs."""
    import torch

    from headatlas.scanning.stream import run_scan

    model = loaded.model

    def forward(impl: str, count: int) -> None:
        model.set_attn_implementation(impl)
        eager = impl == "eager"
        with torch.no_grad():
            for batch in batches[:count]:
                out = model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    output_attentions=eager,
                )
                del out

    def scan(count: int) -> None:
        model.set_attn_implementation("sdpa")  # what capture() restores on exit
        sub = dataclasses.replace(battery, sequences=battery.sequences[: count * batch_size])
        run_scan(loaded, [sub], batch_size)

    n = len(batches)
    return {
        "sdpa": (lambda: forward("sdpa", 1), lambda: forward("sdpa", n)),
        "eager": (lambda: forward("eager", 1), lambda: forward("eager", n)),
        "scan": (lambda: scan(1), lambda: scan(n)),
    }


def _child(args: argparse.Namespace) -> None:
    """Measure one kind's memory in this fresh process and print a JSON line for the parent.

    ``ru_maxrss`` of a freshly exec'd process starts at its parent's peak (Linux keeps the
    pre-exec high-water mark), so the parent starts these children before it loads anything;
    ``start_maxrss_mib`` records that floor.
    """
    start_floor = _maxrss_mib()
    _quiet()
    loaded, battery, batches = _setup(args)
    import gc

    gc.collect()
    load_peak = _maxrss_mib()
    after_load = _current_rss_mib()
    reset = _reset_peak_rss()
    warm_up, full = _runners(loaded, battery, batches, args.batch_size)[args.child]
    warm_up()
    after_warm_up = _current_rss_mib()
    full()
    result = {
        "kind": args.child,
        "start_maxrss_mib": start_floor,
        "rss_after_load_mib": after_load,
        "load_peak_rss_mib": load_peak,
        "peak_reset_after_load": reset,
        "rss_after_warm_up_mib": after_warm_up,
        "peak_rss_mib": _maxrss_mib(),
        "vm_hwm_mib": _proc_status_mib("VmHWM"),
    }
    print(CHILD_MARKER + json.dumps(result), flush=True)


def _child_command(args: argparse.Namespace, kind: str) -> list[str]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        kind,
        "--model",
        args.model,
        "--n-prompts",
        str(args.n_prompts),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    return cmd


def _measure_memory(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    proc = subprocess.run(_child_command(args, kind), capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_MARKER):
            return dict(json.loads(line[len(CHILD_MARKER) :]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    print(f"[memory run for {kind} failed, exit {proc.returncode}]", *tail, sep="\n  ", file=sys.stderr)
    return {"kind": kind, "error": f"exit {proc.returncode}"}


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _table(rows: list[dict[str, Any]]) -> str:
    header = ["run", "median s", "tokens/s", "ratio vs sdpa (time)", "peak RSS MiB", "RSS ratio vs sdpa"]
    body = [
        [
            r["kind"],
            _fmt(r.get("median_s"), ".2f"),
            _fmt(r.get("tokens_per_s"), ",.0f"),
            _fmt(r.get("time_ratio"), ".2f") + ("×" if r.get("time_ratio") is not None else ""),
            _fmt(r.get("peak_rss_mib"), ".0f"),
            _fmt(r.get("rss_ratio"), ".2f") + ("×" if r.get("rss_ratio") is not None else ""),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        parts = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and measure memory of sdpa / eager+output_attentions / headatlas scan.",
    )
    parser.add_argument("--model", default="default", help="model for headatlas.load (default: %(default)s)")
    parser.add_argument(
        "--n-prompts", type=int, default=64, help="natural-battery prompts (default: %(default)s)"
    )
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed full passes per run (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="battery seed (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    parser.add_argument(
        "--runs", default=",".join(KINDS), help="comma-separated run kinds (default: %(default)s)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-kind RSS subprocesses")
    parser.add_argument("--child", choices=KINDS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in KINDS]
    if bad or not runs:
        parser.error(f"--runs takes a comma-separated subset of {','.join(KINDS)}, got {args.runs!r}")
    args.runs = list(dict.fromkeys(runs))
    if args.repeats < 1 or args.n_prompts < 1 or args.batch_size < 1:
        parser.error("--repeats, --n-prompts and --batch-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child is not None:
        _child(args)
        return 0
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    started_at = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = os.getloadavg()
    print(f"command: {command}", flush=True)
    # Memory first: the children must be spawned while this process is still small (see _child).
    memory: dict[str, dict[str, Any]] = {}
    if not args.no_memory:
        for kind in args.runs:
            memory[kind] = _measure_memory(args, kind)
            m = memory[kind]
            if "peak_rss_mib" in m:
                print(
                    f"  memory {kind}: {_fmt(m['rss_after_load_mib'], '.0f')} MiB after load "
                    f"(load peak {m['load_peak_rss_mib']:.0f}), "
                    f"{_fmt(m['rss_after_warm_up_mib'], '.0f')} after warm-up batch, "
                    f"{m['peak_rss_mib']:.0f} MiB run peak",
                    flush=True,
                )

    _quiet()
    import torch

    load_before_timing = os.getloadavg()
    loaded, battery, batches = _setup(args)
    machine = _machine(torch.get_num_threads())
    tokens = int(sum(int(b.attention_mask.sum()) for b in batches))
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['cores_usable']} usable), "
        f"torch {machine['torch']}, transformers {machine['transformers']}, "
        f"python {machine['python']}, torch threads {machine['threads']}"
    )
    print(
        f"model: {loaded.info.name} ({loaded.info.n_layers} layers × {loaded.info.n_heads} heads); "
        f"natural battery: {args.n_prompts} prompts × {args.seq_len} tokens = {tokens} tokens "
        f"in {len(batches)} batches of {args.batch_size}; repeats {args.repeats}",
        flush=True,
    )

    runners = _runners(loaded, battery, batches, args.batch_size)
    for kind in args.runs:
        runners[kind][0]()  # warm-up batch
    times: dict[str, list[float]] = {kind: [] for kind in args.runs}
    for rep in range(args.repeats):
        for kind in args.runs:
            t0 = time.perf_counter()
            runners[kind][1]()
            times[kind].append(time.perf_counter() - t0)
            print(f"  repeat {rep + 1}/{args.repeats} {kind}: {times[kind][-1]:.2f} s", flush=True)
    load_after_timing = os.getloadavg()

    rows: list[dict[str, Any]] = []
    for kind in args.runs:
        median = statistics.median(times[kind])
        mem = memory.get(kind, {})
        rows.append(
            {
                "kind": kind,
                "times_s": times[kind],
                "median_s": median,
                "tokens_per_s": tokens / median,
                "peak_rss_mib": mem.get("peak_rss_mib"),
                "rss_after_load_mib": mem.get("rss_after_load_mib"),
                "load_peak_rss_mib": mem.get("load_peak_rss_mib"),
                "rss_after_warm_up_mib": mem.get("rss_after_warm_up_mib"),
                "start_maxrss_mib": mem.get("start_maxrss_mib"),
                "vm_hwm_mib": mem.get("vm_hwm_mib"),
                "peak_reset_after_load": mem.get("peak_reset_after_load"),
            }
        )
    base = next((r for r in rows if r["kind"] == "sdpa"), None)
    for r in rows:
        r["time_ratio"] = r["median_s"] / base["median_s"] if base else None
        r["rss_ratio"] = (
            r["peak_rss_mib"] / base["peak_rss_mib"]
            if base and r["peak_rss_mib"] is not None and base["peak_rss_mib"] is not None
            else None
        )
    load_after = os.getloadavg()

    print()
    print(_table(rows))
    print()
    for r in rows:
        spread = ", ".join(f"{t:.2f}" for t in r["times_s"])
        extra = ""
        if r["peak_rss_mib"] is not None and r["rss_after_load_mib"] is not None:
            inc = r["peak_rss_mib"] - r["rss_after_load_mib"]
            extra = (
                f"; RSS after load {r['rss_after_load_mib']:.0f} MiB, run peak {r['peak_rss_mib']:.0f} MiB "
                f"(increment {inc:+.0f} MiB; {_fmt(r['rss_after_warm_up_mib'], '.0f')} MiB after the "
                f"warm-up batch); load-time peak {r['load_peak_rss_mib']:.0f} MiB"
            )
            if not r["peak_reset_after_load"]:
                extra += " [peak not reset after load: the run peak includes it]"
        print(f"{r['kind']}: times {spread} s{extra}")
    if base is None:
        print("(no sdpa run: ratios need the sdpa baseline)")
    print(
        "load average (1/5/15 min): "
        f"start {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"before timing {load_before_timing[0]:.2f}/{load_before_timing[1]:.2f}/{load_before_timing[2]:.2f}, "
        f"after timing {load_after_timing[0]:.2f}/{load_after_timing[1]:.2f}/{load_after_timing[2]:.2f}, "
        f"end {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}"
    )
    print(f"command: {command}")

    if args.json:
        report = {
            "command": command,
            "started_at": started_at,
            "machine": machine,
            "model": loaded.info.to_dict(),
            "config": {
                "n_prompts": args.n_prompts,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "seed": args.seed,
                "tokens": tokens,
                "batches": len(batches),
            },
            "load_average": {
                "start": load_before,
                "before_timing": load_before_timing,
                "after_timing": load_after_timing,
                "end": load_after,
            },
            "runs": rows,
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
