"""Benchmark headatlas' fast capture against plain forward passes and TransformerLens.

For each model and sequence length T, one batch of ``--batch-size`` × T tokens is built once and
every run below reads exactly that batch:

- (a)  ``sdpa``: plain forward pass of the full model (LM head included),
  ``set_attn_implementation("sdpa")``, no grad — the limit;
- (a') ``sdpa_body``: the same for the transformer body only (``model.base_model``), which is what a
  headatlas scan runs (no score needs the LM head);
- (b)  ``eager``: full forward pass with ``set_attn_implementation("eager")`` and
  ``output_attentions=True``; skipped when its attention maps alone (L × H × B × T² × 4 bytes)
  would exceed ``--eager-limit-gib``;
- (c)  ``scan``: ``headatlas.scanning.stream.run_scan`` of that one batch — capture plus every
  natural-battery score (previous_token, self, first_token, local, entropy, entropy_norm,
  subword where word ids exist, distance profile);
- (d)  TransformerLens ``detect_head`` for its three built-in detectors, run by ``tl_detect.py`` in a
  separate virtual environment (``--tl-python``): (d-i) the documented use, one ``detect_head``
  call per detector, each running the model itself; (d-ii) one ``run_with_cache`` per sequence
  shared by the three detectors. See ``tl_detect.py``.

Models: ``default`` (headatlas' packaged SmolLM2-135M, 30 layers × 9 heads, natural battery from
UD English EWT) and ``gpt2`` (random-init ``GPT2LMHeadModel``: 12 layers × 12 heads, d 768, vocab
50257, seed 0; uniformly random token ids, so no word ids and no subword score). The GPT-2 context
is ``max(2048, max T) + 1`` positions, on both sides: TransformerLens' ``detect_head`` asserts
T < n_ctx.

Timing (this process for (a)-(c), one ``tl_detect.py`` process per model and T for (d)): one warm-up
run per kind (for (d) on the first 64 tokens of each sequence: a full-length TransformerLens
warm-up would add minutes per cell), then ``--repeats`` timed runs interleaved round-robin; the
median wall time (``time.perf_counter``) is reported. Every ratio comes from numbers measured in
the same invocation, within one (model, T) cell. ``--tl-seq-lens`` limits (d) to some T.

Memory (one fresh subprocess per model, T and run: this script re-invoked with hidden ``--child-*``
flags, or ``tl_detect.py --mode memory``): RSS after the model is loaded and the batch built (and,
for (a)-(c), a 64-token warm-up), then one run. The peak is the RSS high-water mark of that run
with the model resident (nothing subtracted): the mark is reset after loading (Linux
``/proc/self/clear_refs``), because loading briefly holds more than it keeps, and read from
``VmHWM``. ``ru_maxrss`` (``getrusage(RUSAGE_SELF)``) is recorded too but cannot serve alone: it
starts at the parent's peak in an exec'd child, and the kernel folds the pre-reset mark into it
whenever a thread exits, so it keeps the load-time peak.

``--long 8192``: one batch of 1 × 8192 tokens of the default model (natural battery, 1 prompt),
(c) scan and, for reference, (a') body forward, each in its own subprocess: wall time of one run
after a 64-token warm-up, and peak RSS. Eager ``output_attentions`` is not run there; the memory
its attention maps alone would need is printed.

``--wait-for bench_scan.py,pytest`` polls every 30 s before each timed block until no python
process runs a script (or ``-m`` module) of those names (CPU contention spoils timings).

Usage: ``.venv/bin/python bench/bench_capture.py [--seq-lens 256,1024,2048 --batch-size 4
--repeats 3 --long 8192 --tl-python /tmp/tl-venv/bin/python --wait-for bench_scan.py]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any

from benchlib import cpu_model as _cpu_model
from benchlib import current_rss_mib as _current_rss_mib
from benchlib import maxrss_mib as _maxrss_mib
from benchlib import peak_since_reset_mib as _peak_since_reset_mib
from benchlib import quiet
from benchlib import reset_peak_rss as _reset_peak_rss

MODELS = ("default", "gpt2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
"""``gpt2`` is a random GPT-2 small built in code; the others are packaged models loaded by name."""
RUNS = ("sdpa", "sdpa_body", "eager", "scan")
TL_VARIANTS = ("documented", "shared")
LABELS = {
    "sdpa": "(a) sdpa full",
    "sdpa_body": "(a') sdpa body",
    "eager": "(b) eager+attn",
    "scan": "(c) headatlas scan",
    "tl_documented": "(d-i) TL documented",
    "tl_shared": "(d-ii) TL shared cache",
}
CHILD_MARKER = "BENCH_CHILD_RESULT "
TL_MARKER = "TL_RESULT "
GPT2_VOCAB = 50257
GPT2_EOS = 50256
WARMUP_TOKENS = 64
HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- process facts


def _quiet() -> None:
    import warnings

    quiet()
    warnings.filterwarnings("ignore")


def _ancestors() -> set[int]:
    pids = {os.getpid()}
    pid = os.getpid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        pids.add(pid)
    return pids


def _running(script: str) -> list[int]:
    """PIDs of python processes (not this one or its ancestors) whose script is named ``script``."""
    mine = _ancestors()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and "python" in os.path.basename(argv[0]) and script in map(os.path.basename, argv[1:3]):
            found.append(int(entry))
    return found


def _wait_for(scripts: str | None) -> None:
    """Poll every 30 s while a python process runs one of the comma-separated ``scripts``."""
    names = [n.strip() for n in (scripts or "").split(",") if n.strip()]
    announced = False
    while busy := {n: p for n in names if (p := _running(n))}:
        if not announced:
            print(f"  [waiting while {busy} run; polling every 30 s]", flush=True)
            announced = True
        time.sleep(30)
    if announced:
        print("  [finished; going on]", flush=True)


def _guarded(
    scripts: str | None, block: Callable[[], Any], what: str, tries: int = 4
) -> tuple[Any, list[str]]:
    """Run ``block`` after :func:`_wait_for`; redo it (up to ``tries`` times) if a watched script
    started while it ran. Returns ``(result, disturbances)``; a non-empty list on the last try
    means the result was still contended."""
    import threading

    names = [n.strip() for n in (scripts or "").split(",") if n.strip()]
    seen: list[str] = []
    result: Any = None
    for attempt in range(tries):
        _wait_for(scripts)
        seen = []
        stop = threading.Event()

        def watch(seen: list[str] = seen, stop: threading.Event = stop) -> None:
            while not stop.wait(2.0):
                for name in names:
                    if name not in seen and _running(name):
                        seen.append(name)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            result = block()
        finally:
            stop.set()
            watcher.join()
        if not seen:
            break
        if attempt + 1 < tries:
            print(f"  [{what}: {', '.join(seen)} ran meanwhile; redoing]", flush=True)
    return result, seen


# --------------------------------------------------------------------------- models and batches


def _load(model_kind: str, n_ctx: int, threads: int | None) -> Any:
    import torch

    import headatlas as ha

    if threads is not None:
        torch.set_num_threads(threads)
    if model_kind != "gpt2":
        return ha.load(model_kind)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=n_ctx, vocab_size=GPT2_VOCAB)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    # No tokenizer can be downloaded; ha.load only stores this one, and the scan only reads the
    # pad/eos/bos ids (pad_id, natural battery) from it.
    tokenizer = types.SimpleNamespace(
        pad_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, bos_token_id=None, all_special_ids=[GPT2_EOS]
    )
    return ha.load(model, tokenizer=tokenizer)


def _battery(lm: Any, model_kind: str, batch_size: int, seq_len: int, seed: int) -> Any:
    """The natural battery of exactly ``batch_size`` sequences of ``seq_len`` tokens."""
    import numpy as np

    from headatlas.batteries.base import TEXT_DETECTORS, Battery, ProbeSequence
    from headatlas.scanning.config import ScanConfig
    from headatlas.scanning.scan import build_batteries

    if model_kind != "gpt2":
        (battery,) = build_batteries(
            lm, ScanConfig.of(["natural"], n_prompts=batch_size, seq_len=seq_len, seed=seed)
        )
        return battery
    rng = np.random.default_rng([seed, seq_len])
    ids = rng.integers(0, GPT2_VOCAB, size=(batch_size, seq_len))
    sequences = [ProbeSequence(tuple(int(t) for t in row), None) for row in ids]
    params = {"n_prompts": batch_size, "seq_len": seq_len, "seed": seed, "source": "uniform random ids"}
    return Battery("natural", sequences, TEXT_DETECTORS, params)


def _runner(kind: str, lm: Any, battery: Any) -> tuple[Callable[[], None], Callable[[], None]]:
    """Return ``(prepare, run)`` for one run kind on ``battery`` (which is exactly one batch)."""
    import torch

    from headatlas.batteries.base import make_batch, pad_id
    from headatlas.scanning.stream import run_scan

    model = lm.model
    batch = make_batch(battery.sequences, pad_id(lm.tokenizer))
    ids, mask = batch.input_ids, batch.attention_mask

    if kind in ("sdpa", "sdpa_body", "eager"):
        impl = "eager" if kind == "eager" else "sdpa"
        target = model.base_model if kind == "sdpa_body" else model

        def prepare() -> None:
            model.set_attn_implementation(impl)

        def run() -> None:
            with torch.no_grad():
                out = target(input_ids=ids, attention_mask=mask, output_attentions=kind == "eager")
            del out

        return prepare, run

    if kind == "scan":

        def prepare_scan() -> None:
            model.set_attn_implementation("sdpa")  # what capture() restores on exit

        def scan() -> None:
            run_scan(lm, [battery], len(battery.sequences))

        return prepare_scan, scan
    raise ValueError(kind)


def _eager_gib(lm: Any, batch_size: int, seq_len: int) -> float:
    info = lm.info
    return info.n_layers * info.n_heads * batch_size * seq_len**2 * 4 / 2**30


def _eager_gib_shape(n_layers: int, n_heads: int, batch_size: int, seq_len: int) -> float:
    return n_layers * n_heads * batch_size * seq_len**2 * 4 / 2**30


# --------------------------------------------------------------------------- memory children


def _child(args: argparse.Namespace) -> None:
    """Measure one run's memory (and the wall time of that one run) in this fresh process."""
    _quiet()
    import gc

    lm = _load(args.child_model, args.n_ctx, args.threads)
    battery = _battery(lm, args.child_model, args.batch_size, args.child_seq_len, args.seed)
    warm = _battery(lm, args.child_model, 1, WARMUP_TOKENS, args.seed)
    warm_prepare, warm_run = _runner(args.child_run, lm, warm)
    warm_prepare()
    warm_run()
    prepare, run = _runner(args.child_run, lm, battery)
    prepare()
    gc.collect()
    load_peak = _maxrss_mib()
    after_load = _current_rss_mib()
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    result = {
        "model": args.child_model,
        "run": args.child_run,
        "seq_len": args.child_seq_len,
        "batch_size": args.batch_size,
        "rss_after_load_mib": after_load,
        "load_peak_rss_mib": load_peak,
        "peak_reset_after_load": reset,
        "peak_rss_mib": _peak_since_reset_mib() if reset else _maxrss_mib(),
        "ru_maxrss_mib": _maxrss_mib(),
        "run_s": seconds,
    }
    print(CHILD_MARKER + json.dumps(result), flush=True)


def _child_command(
    args: argparse.Namespace, model_kind: str, run: str, seq_len: int, batch: int
) -> list[str]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child-model",
        model_kind,
        "--child-run",
        run,
        "--child-seq-len",
        str(seq_len),
        "--batch-size",
        str(batch),
        "--seed",
        str(args.seed),
        "--n-ctx",
        str(args.n_ctx),
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    return cmd


def _run_marked(cmd: list[str], marker: str, what: str, limit_gib: float | None = None) -> dict[str, Any]:
    """Run ``cmd`` and return the JSON after ``marker``; ``limit_gib`` caps its address space
    (``RLIMIT_AS``), so a run that would exhaust the machine fails alone with a MemoryError."""

    def cap() -> None:
        if limit_gib is not None:
            import resource

            size = int(limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, preexec_fn=cap)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(marker):
            return dict(json.loads(line[len(marker) :]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    print(f"  [{what} failed, exit {proc.returncode}]", *tail, sep="\n    ", file=sys.stderr, flush=True)
    text = "\n".join(tail)
    if limit_gib is not None and ("can't allocate memory" in text or "MemoryError" in text):
        return {"error": f"out of memory (address space capped at {limit_gib:g} GiB)", "oom": True}
    return {"error": f"exit {proc.returncode}: {tail[-1] if tail else ''}"}


# --------------------------------------------------------------------------- TransformerLens


def _tl_command(
    args: argparse.Namespace, lm: Any, model_kind: str, ids_file: str, mode: str, variant: str | None
) -> list[str]:
    cmd = [
        args.tl_python,
        os.path.join(HERE, "tl_detect.py"),
        "--model",
        model_kind,
        "--ids",
        ids_file,
        "--n-ctx",
        str(args.n_ctx),
        "--mode",
        mode,
        "--repeats",
        str(args.repeats),
    ]
    if model_kind != "gpt2":
        cmd += ["--model-path", str(lm.model.name_or_path)]
    if variant is not None:
        cmd += ["--variant", variant]
    elif mode == "time":
        cmd += ["--variants", ",".join(args.tl_variants)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    return cmd


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def _markdown(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        parts = [
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ("-" if i < 2 else ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def _time_cell(cell: dict[str, Any], key: str) -> str:
    entry = cell["runs"].get(key, {})
    if "skipped" in entry:
        return "skipped"
    return _fmt(entry.get("median_s"), ".2f")


def _time_table(cells: list[dict[str, Any]]) -> str:
    keys = ["sdpa", "sdpa_body", "eager", "scan", "tl_documented", "tl_shared"]
    header = ["model", "B×T", *(LABELS[k] + " s" for k in keys)]
    header += ["(c)/(a)", "(c)/(a')", "(b)/(a)", "(d-i)/(c)", "(d-ii)/(c)"]
    body = []
    for cell in cells:
        r = cell["ratios"]
        body.append(
            [
                cell["model"],
                f"{cell['batch_size']}×{cell['seq_len']}",
                *(_time_cell(cell, k) for k in keys),
                _fmt(r.get("scan/sdpa"), ".2f", "×"),
                _fmt(r.get("scan/sdpa_body"), ".2f", "×"),
                _fmt(r.get("eager/sdpa"), ".2f", "×"),
                _fmt(r.get("tl_documented/scan"), ".1f", "×"),
                _fmt(r.get("tl_shared/scan"), ".1f", "×"),
            ]
        )
    return _markdown(header, body)


def _mem_cell(cell: dict[str, Any], key: str) -> str:
    entry = cell["runs"].get(key, {})
    if "skipped" in entry:
        return "skipped"
    mem = entry.get("memory", {})
    peak, load = mem.get("peak_rss_mib"), mem.get("rss_after_load_mib")
    if peak is None:
        return "error" if "error" in mem else "n/a"
    return f"{peak:.0f} (+{peak - load:.0f})" if load is not None else f"{peak:.0f}"


def _memory_table(cells: list[dict[str, Any]]) -> str:
    keys = ["sdpa", "sdpa_body", "eager", "scan", "tl_documented", "tl_shared"]
    header = ["model", "B×T", *(LABELS[k] for k in keys), "RSS (c)/(a)", "RSS (c)/(a')"]
    body = []
    for cell in cells:
        r = cell["ratios"]
        body.append(
            [
                cell["model"],
                f"{cell['batch_size']}×{cell['seq_len']}",
                *(_mem_cell(cell, k) for k in keys),
                _fmt(r.get("rss scan/sdpa"), ".2f", "×"),
                _fmt(r.get("rss scan/sdpa_body"), ".2f", "×"),
            ]
        )
    return _markdown(header, body)


def _long_table(long: dict[str, Any]) -> str:
    header = ["model", "B×T", "run", "wall s (1 run)", "RSS after load MiB", "peak RSS MiB", "increment MiB"]
    body = []
    for key in ("sdpa_body", "scan"):
        m = long["runs"].get(key, {})
        peak, load = m.get("peak_rss_mib"), m.get("rss_after_load_mib")
        body.append(
            [
                long["model"],
                f"1×{long['seq_len']}",
                LABELS[key],
                _fmt(m.get("run_s"), ".1f") if "error" not in m else "failed: " + m["error"],
                _fmt(load, ".0f"),
                _fmt(peak, ".0f"),
                _fmt(None if peak is None or load is None else peak - load, "+.0f"),
            ]
        )
    return _markdown(header, body)


def _targets(cells: list[dict[str, Any]], long: dict[str, Any] | None) -> list[str]:
    lines = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    for cell in cells:
        r, name = cell["ratios"], f"{cell['model']} T={cell['seq_len']}"
        if cell["seq_len"] == 1024:
            for key, label in (("scan/sdpa", "(c)/(a)"), ("scan/sdpa_body", "(c)/(a')")):
                v = r.get(key)
                lines.append(
                    f"{name}: {label} = {_fmt(v, '.2f')} (target ≤ 1.3): {verdict(None if v is None else v <= 1.3)}"
                )
            for key, label in (("tl_documented/scan", "(d-i)/(c)"), ("tl_shared/scan", "(d-ii)/(c)")):
                v = r.get(key)
                lines.append(
                    f"{name}: {label} = {_fmt(v, '.2f')} (target ≥ 3): {verdict(None if v is None else v >= 3)}"
                )
        if cell["seq_len"] == 2048:
            for key, label in (
                ("rss scan/sdpa", "peak RSS (c)/(a)"),
                ("rss scan/sdpa_body", "peak RSS (c)/(a')"),
            ):
                v = r.get(key)
                lines.append(
                    f"{name}: {label} = {_fmt(v, '.2f')} (target ≤ 1.25): {verdict(None if v is None else v <= 1.25)}"
                )
    if long is not None:
        m = long["runs"].get("scan", {})
        ok = "peak_rss_mib" in m
        lines.append(
            f"default T={long['seq_len']}: scan {'completed' if ok else 'FAILED'}"
            + (f" in {m['run_s']:.1f} s, peak RSS {m['peak_rss_mib']:.0f} MiB" if ok else "")
        )
    return lines


# --------------------------------------------------------------------------- main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and measure memory of sdpa / eager+output_attentions / headatlas scan / "
        "TransformerLens detect_head on one batch per model and sequence length.",
    )
    parser.add_argument(
        "--models",
        default="default,gpt2",
        help=f"comma-separated subset of {','.join(MODELS)} (default: default,gpt2)",
    )
    parser.add_argument(
        "--seq-lens", default="256,1024,2048", help="comma-separated sequence lengths (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="sequences in the batch (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per kind (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="battery / token seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--eager-limit-gib",
        type=float,
        default=16.0,
        help="skip (b) when L×H×B×T²×4 bytes exceed this (default: %(default)s)",
    )
    parser.add_argument(
        "--long", type=int, default=None, metavar="T", help="also scan the default model on 1 × T tokens"
    )
    parser.add_argument(
        "--tl-python",
        default="/tmp/tl-venv/bin/python",
        help="python of a venv with transformer-lens (default: %(default)s)",
    )
    parser.add_argument("--no-tl", action="store_true", help="skip TransformerLens (d)")
    parser.add_argument(
        "--tl-seq-lens", default=None, help="run (d) only at these comma-separated T (default: all)"
    )
    parser.add_argument(
        "--tl-variants",
        default=",".join(TL_VARIANTS),
        help="TransformerLens variants to run: documented, shared (default: %(default)s)",
    )
    parser.add_argument(
        "--tl-memory-gib",
        type=float,
        default=20.0,
        help="address-space cap of the TransformerLens processes: beyond it TL reports out of memory "
        "instead of exhausting the machine (default: %(default)s)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument(
        "--wait-for",
        default=None,
        metavar="SCRIPT",
        help="comma-separated scripts to wait for before each timed block",
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    parser.add_argument("--n-ctx", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-model", choices=MODELS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-run", choices=RUNS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-seq-len", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in MODELS for m in args.models):
        parser.error(f"--models takes a comma-separated subset of {','.join(MODELS)}")
    try:
        args.seq_lens = [int(t) for t in args.seq_lens.split(",") if t.strip()]
    except ValueError:
        parser.error("--seq-lens takes comma-separated integers")
    if not args.seq_lens or min(args.seq_lens) < 8:
        parser.error("--seq-lens must be at least 8")
    if args.repeats < 1 or args.batch_size < 1:
        parser.error("--repeats and --batch-size must be at least 1")
    if args.tl_seq_lens is not None:
        args.tl_seq_lens = [int(t) for t in args.tl_seq_lens.split(",") if t.strip()]
    args.tl_variants = [v.strip() for v in args.tl_variants.split(",") if v.strip()]
    if not args.tl_variants or any(v not in TL_VARIANTS for v in args.tl_variants):
        parser.error(f"--tl-variants takes a comma-separated subset of {','.join(TL_VARIANTS)}")
    if args.n_ctx is None:
        args.n_ctx = max(2048, *args.seq_lens) + 1
    return args


def _measure_cell(args: argparse.Namespace, lm: Any, model_kind: str, seq_len: int) -> dict[str, Any]:
    """Time (a)-(d) on one batch, then measure their memory in fresh processes."""
    battery = _battery(lm, model_kind, args.batch_size, seq_len, args.seed)
    eager_gib = _eager_gib(lm, args.batch_size, seq_len)
    runs: dict[str, dict[str, Any]] = {}
    kinds = list(RUNS)
    if eager_gib > args.eager_limit_gib:
        runs["eager"] = {"skipped": f"would need {eager_gib:.1f} GiB for the attention maps alone"}
        kinds.remove("eager")
        print(f"  (b) eager skipped: would need {eager_gib:.1f} GiB", flush=True)
    runners = {k: _runner(k, lm, battery) for k in kinds}

    def timing() -> dict[str, list[float]]:
        for kind in kinds:  # warm-up
            prepare, run = runners[kind]
            prepare()
            run()
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for rep in range(args.repeats):
            for kind in kinds:
                prepare, run = runners[kind]
                prepare()
                t0 = time.perf_counter()
                run()
                times[kind].append(time.perf_counter() - t0)
            print(
                f"  repeat {rep + 1}/{args.repeats}: "
                + ", ".join(f"{LABELS[k]} {times[k][-1]:.2f} s" for k in kinds),
                flush=True,
            )
        return times

    _wait_for(args.wait_for)
    load_start = os.getloadavg()
    times, contended = _guarded(args.wait_for, timing, "HF timing")
    lm.model.set_attn_implementation("sdpa")
    for kind in kinds:
        runs[kind] = {"times_s": times[kind], "median_s": statistics.median(times[kind])}
    load_after_hf = os.getloadavg()

    tl: dict[str, Any] = {}
    ids_file = None
    want_tl = not args.no_tl and (args.tl_seq_lens is None or seq_len in args.tl_seq_lens)
    if not want_tl and not args.no_tl:
        for v in TL_VARIANTS:
            runs[f"tl_{v}"] = {"skipped": "not in --tl-seq-lens"}
    if want_tl and os.path.exists(args.tl_python):
        with tempfile.NamedTemporaryFile(
            "w", suffix=".json", prefix="bench_capture_ids_", delete=False
        ) as fh:
            json.dump({"ids": [list(s.ids) for s in battery.sequences]}, fh)
            ids_file = fh.name
        tl, tl_contended = _guarded(
            args.wait_for,
            lambda: _run_marked(
                _tl_command(args, lm, model_kind, ids_file, "time", None),
                TL_MARKER,
                "TransformerLens timing",
                args.tl_memory_gib,
            ),
            "TL timing",
        )
        if tl_contended:
            tl["contended_by"] = tl_contended
        for v in TL_VARIANTS:
            key = f"tl_{v}"
            if v not in args.tl_variants:
                runs[key] = {"skipped": "not in --tl-variants"}
            elif "median_s" in tl:
                runs[key] = {"times_s": tl["times_s"][v], "median_s": tl["median_s"][v]}
            else:
                runs[key] = {k: tl[k] for k in ("error", "oom") if k in tl} or {"error": "no result"}
        if "median_s" in tl:
            print(
                "  TransformerLens: "
                + ", ".join(
                    f"{v} {', '.join(f'{t:.2f}' for t in tl['times_s'][v])} s" for v in args.tl_variants
                ),
                flush=True,
            )
    elif want_tl:
        for v in TL_VARIANTS:
            runs[f"tl_{v}"] = {"error": f"no TransformerLens python at {args.tl_python}"}

    if not args.no_memory:
        for kind in kinds:
            mem = _run_marked(
                _child_command(args, model_kind, kind, seq_len, args.batch_size),
                CHILD_MARKER,
                f"memory run {kind}",
            )
            runs[kind]["memory"] = mem
            print(f"  memory {LABELS[kind]}: {_mem_line(mem)}", flush=True)
        if ids_file is not None and "median_s" in tl:
            for v in args.tl_variants:
                mem = _run_marked(
                    _tl_command(args, lm, model_kind, ids_file, "memory", v),
                    TL_MARKER,
                    f"TL memory {v}",
                    args.tl_memory_gib,
                )
                runs[f"tl_{v}"]["memory"] = mem
                print(f"  memory {LABELS['tl_' + v]}: {_mem_line(mem)}", flush=True)
    if ids_file is not None:
        os.unlink(ids_file)

    def med(key: str) -> float | None:
        return runs.get(key, {}).get("median_s")

    def peak(key: str) -> float | None:
        return runs.get(key, {}).get("memory", {}).get("peak_rss_mib")

    ratios = {
        "scan/sdpa": _ratio(med("scan"), med("sdpa")),
        "scan/sdpa_body": _ratio(med("scan"), med("sdpa_body")),
        "eager/sdpa": _ratio(med("eager"), med("sdpa")),
        "tl_documented/scan": _ratio(med("tl_documented"), med("scan")),
        "tl_shared/scan": _ratio(med("tl_shared"), med("scan")),
        "rss scan/sdpa": _ratio(peak("scan"), peak("sdpa")),
        "rss scan/sdpa_body": _ratio(peak("scan"), peak("sdpa_body")),
        "rss eager/sdpa": _ratio(peak("eager"), peak("sdpa")),
    }
    return {
        "model": model_kind,
        "model_name": lm.info.name,
        "n_layers": lm.info.n_layers,
        "n_heads": lm.info.n_heads,
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "tokens": args.batch_size * seq_len,
        "eager_attention_gib": eager_gib,
        "runs": runs,
        "ratios": ratios,
        "tl_info": {k: v for k, v in tl.items() if k not in ("times_s", "median_s")},
        "load_average": {"start": load_start, "after_hf_timing": load_after_hf, "end": os.getloadavg()},
        "hf_timing_contended_by": contended,
    }


def _mem_line(mem: dict[str, Any]) -> str:
    if "peak_rss_mib" not in mem:
        return "failed (" + str(mem.get("error")) + ")"
    load = mem.get("rss_after_load_mib")
    return (
        f"{_fmt(load, '.0f')} MiB after load -> {mem['peak_rss_mib']:.0f} MiB peak"
        f" (load-time peak {mem.get('load_peak_rss_mib', 0):.0f}; one run {mem.get('run_s', 0):.2f} s)"
    )


def _long(args: argparse.Namespace) -> dict[str, Any]:
    runs = {}
    for kind in ("sdpa_body", "scan"):
        cmd = _child_command(args, "default", kind, args.long, 1)
        mem, contended = _guarded(
            args.wait_for, lambda cmd=cmd: _run_marked(cmd, CHILD_MARKER, "long"), "long"
        )
        if contended:
            mem["contended_by"] = contended
        runs[kind] = mem
        print(f"  long {LABELS[kind]}: {_mem_line(mem)}", flush=True)
    return {
        "model": "default",
        "seq_len": args.long,
        "runs": runs,
        "eager_attention_gib": _eager_gib_shape(30, 9, 1, args.long),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child_run is not None:
        _child(args)
        return 0
    _quiet()
    import torch
    import transformers

    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    started_at = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    machine = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": args.threads or torch.get_num_threads(),
    }
    print(f"command: {command}")
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, python {machine['python']}, "
        f"torch threads {machine['threads']}",
        flush=True,
    )
    cells: list[dict[str, Any]] = []
    for model_kind in args.models:
        lm = _load(model_kind, args.n_ctx, args.threads)
        print(
            f"model {model_kind}: {lm.info.name} ({lm.info.arch}, {lm.info.n_layers} layers × "
            f"{lm.info.n_heads} heads, {lm.info.n_kv_heads} kv heads)",
            flush=True,
        )
        for seq_len in args.seq_lens:
            print(f"{model_kind} B×T = {args.batch_size}×{seq_len}:", flush=True)
            cells.append(_measure_cell(args, lm, model_kind, seq_len))
            if args.json:  # partial results survive an interrupted run
                with open(args.json + ".partial", "w") as fh:
                    json.dump({"command": command, "machine": machine, "cells": cells}, fh, default=str)
        del lm
    long = _long(args) if args.long else None

    print()
    print("Median wall time, seconds (ratios from this run):")
    print(_time_table(cells))
    if not args.no_memory:
        print()
        print("Peak RSS, MiB (increment over RSS after load in parentheses), one fresh process per run:")
        print(_memory_table(cells))
    if long is not None:
        print()
        print(
            f"Long context, default model, 1 × {long['seq_len']} tokens "
            f"(eager output_attentions not run: its attention maps alone would need "
            f"{long['eager_attention_gib']:.1f} GiB):"
        )
        print(_long_table(long))
    print()
    for cell in cells:
        notes = []
        diff = cell["tl_info"].get("max_abs_diff_documented_vs_shared_warmup")
        if diff is not None:
            notes.append(f"TL documented vs shared scores (warm-up) max |diff| {diff:.2e}")
        la = cell["load_average"]
        notes.append(
            "load avg (1 min) start/after HF timing/end "
            f"{la['start'][0]:.2f}/{la['after_hf_timing'][0]:.2f}/{la['end'][0]:.2f}"
        )
        if cell["hf_timing_contended_by"]:
            notes.append(f"HF timing still contended by {cell['hf_timing_contended_by']}")
        if cell["tl_info"].get("contended_by"):
            notes.append(f"TL timing still contended by {cell['tl_info']['contended_by']}")
        print(f"{cell['model']} T={cell['seq_len']}: " + "; ".join(notes))
    print()
    print("Targets:")
    for line in _targets(cells, long):
        print("  " + line)
    print(f"command: {command}")
    if args.json:
        report = {
            "command": command,
            "started_at": started_at,
            "finished_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine,
            "config": {
                "models": args.models,
                "seq_lens": args.seq_lens,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "seed": args.seed,
                "gpt2_n_ctx": args.n_ctx,
                "eager_limit_gib": args.eager_limit_gib,
            },
            "cells": cells,
            "long": long,
            "targets": _targets(cells, long),
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
