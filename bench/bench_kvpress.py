"""kvpress presses on the prompts of ``bench_kv.py``, run in kvpress's own venv, in one run.

kvpress 0.5.5 needs transformers < 5.3 and headatlas needs 5.x ≥ 5.3, so this script never
imports headatlas: it reads the samples that ``bench_kv.py --export-tasks FILE`` wrote (prompt
token ids, expected strings, token limits; same model, tasks, lengths, n and seed) and the
model's weights from a local Hugging Face directory. Rows (every sample runs through every row):

- ``full``: transformers' ``DynamicCache``, no press (the baseline of this run);
- ``<Press> F``: ``StreamingLLMPress``, ``SnapKVPress``, ``ExpectedAttentionPress``,
  ``AdaKVPress(ExpectedAttentionPress)``, ``KnormPress`` at ``compression_ratio = 1 - F``;
- ``DuoAttentionPress F``: the pattern of ``headatlas kv export PLAN --format duo --out DIR``
  (``--duo F=DIR``), read from the local directory instead of kvpress's download.

As in ``bench_kv.py``, the prompt except its last token is prefilled in one forward inside the
press's context manager (kvpress compresses there; the question is part of what is compressed),
then greedy decoding starts from the last prompt token, with positions continuing from the
uncompressed length (what kvpress's pipeline does). Generation stops at EOS, the task's token
limit, or once every expected string is in the answer. Columns: exact match (every expected string
occurs in the answer), KV bytes really held after prefill (sum of the cache tensors' ``nbytes``),
prefill seconds, decode ms per generated token. Usage (from ``bench/``)::

    .venv-kvpress/bin/python bench_kvpress.py --tasks-file tasks.json --model-dir DIR \\
        --duo 0.25=duo-0.25 --json kvpress.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchlib import cpu_model, current_rss_mib, quiet, usable_cores

PRESSES = ("StreamingLLMPress", "SnapKVPress", "ExpectedAttentionPress", "AdaKVPress", "KnormPress")


def _local_duo_class() -> type:
    """``DuoAttentionPress`` reading its pattern from a local DuoAttention directory.

    kvpress's ``load_attention_pattern`` downloads the patterns of a few known checkpoints; this
    subclass reads ``full_attention_heads.tsv`` and ``config.json`` from ``pattern_dir`` instead.
    """
    from dataclasses import dataclass

    from kvpress import DuoAttentionPress

    @dataclass
    class LocalDuoAttentionPress(DuoAttentionPress):
        pattern_dir: str = ""

        def load_attention_pattern(self, model: Any) -> tuple[int, int, np.ndarray]:
            return _read_duo(self.pattern_dir)

    return LocalDuoAttentionPress


def _read_duo(directory: str) -> tuple[int, int, np.ndarray]:
    """``(sink, recent, gates [layer, kv_head])`` of a DuoAttention pattern directory."""
    where = Path(directory)
    gates = np.clip(np.loadtxt(where / "full_attention_heads.tsv", dtype=float, delimiter="\t"), 0, 1)
    config = json.loads((where / "config.json").read_text())
    return int(config["sink_size"]), int(config["recent_size"]), gates


def _duo_press(directory: str) -> Any:
    """The local pattern's press; ``head_compression_ratio`` is its share of streaming KV heads
    (gate below 0.5), so kvpress's own rule (lowest gates stream) streams exactly those heads."""
    gates = _read_duo(directory)[2]
    return _local_duo_class()(head_compression_ratio=float((gates < 0.5).mean()), pattern_dir=directory)


def _press(name: str, ratio: float, args: argparse.Namespace) -> Any:
    """The press ``name`` at ``compression_ratio = ratio`` (kvpress's defaults otherwise)."""
    import kvpress

    if name == "StreamingLLMPress":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=args.sink)
    if name == "AdaKVPress":
        return kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio))
    return getattr(kvpress, name)(compression_ratio=ratio)


def _sliding(model: Any) -> list[bool]:
    """Per layer, whether the model's own attention is a sliding window (Gemma 3's local layers)."""
    types = getattr(model.config, "layer_types", None) or []
    return [t == "sliding_attention" for t in types] or [False] * model.config.num_hidden_layers


def _apply(press: Any, model: Any) -> Any:
    """``press(model)``, or, for a model with sliding layers, the press on its global layers only.

    kvpress 0.5.5 skips Gemma 3's sliding layers only for ``Gemma3ForConditionalGeneration``; on the
    text-only ``Gemma3ForCausalLM`` it hooks every layer, and its ``rotary_emb`` calls (ExpectedAttention,
    AdaKV) fail because Gemma 3's rotary module needs a ``layer_type``. headatlas leaves the sliding
    layers as they are, so for a like-for-like row the press is hooked on the global layers only
    (the rule kvpress applies to Gemma 3 itself) and given the global rotary embedding.
    """
    import functools
    from contextlib import contextmanager

    sliding = _sliding(model)
    if not any(sliding):
        return press(model)

    @contextmanager
    def on_global_layers() -> Any:
        press.post_init_from_model(model)
        hooks = []
        rotary = functools.partial(model.model.rotary_emb, layer_type="full_attention")
        try:
            for layer, is_sliding in zip(model.model.layers, sliding, strict=True):
                if not is_sliding:
                    layer.self_attn.rotary_emb = rotary
                    hooks.append(layer.self_attn.register_forward_hook(press.forward_hook, with_kwargs=True))
            yield
        finally:
            for hook in hooks:
                hook.remove()

    return on_global_layers()


def global_ratio(kept: float, layer_bytes: list[int], sliding: list[bool]) -> float | None:
    """The ``compression_ratio`` on the global layers that leaves ``kept`` of all KV bytes held
    (sliding layers untouched), or None when the sliding layers alone exceed ``kept``."""
    total = sum(layer_bytes)
    fixed = sum(b for b, s in zip(layer_bytes, sliding, strict=True) if s)
    share = (kept * total - fixed) / (total - fixed)
    return None if share <= 0 else 1 - share


def layer_nbytes(cache: Any) -> list[int]:
    """Bytes of keys and values held per cache layer."""
    sizes = []
    for layer in cache.layers:
        tensors = [getattr(layer, name, None) for name in ("keys", "values")]
        sizes.append(sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor)))
    return sizes


def run_sample(model: Any, tokenizer: Any, sample: dict[str, Any], press: Any) -> dict[str, Any]:
    """Prefill one sample under ``press`` (None: no press), decode greedily; return its measures."""
    import contextlib

    from transformers import DynamicCache

    ids = torch.tensor([sample["input_ids"]])
    length = ids.shape[1]
    cache = DynamicCache(config=model.config)  # Gemma 3's sliding layers keep their window
    with torch.no_grad():
        ctx = _apply(press, model) if press is not None else contextlib.nullcontext()
        start = time.perf_counter()
        with ctx:
            model.model(input_ids=ids[:, :-1], past_key_values=cache)
        prefill_s = time.perf_counter() - start
        per_layer = layer_nbytes(cache)
        held = sum(per_layer)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        token, new = ids[:, -1:], []
        start = time.perf_counter()
        for step in range(sample["max_new_tokens"]):
            position = torch.tensor([[length - 1 + step]])
            out = model(input_ids=token, past_key_values=cache, position_ids=position, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            new.append(int(token))
            text = tokenizer.decode(new, skip_special_tokens=True)
            if new[-1] in eos or all(value in text for value in sample["expected"]):
                break
        decode_s = time.perf_counter() - start
    text = tokenizer.decode(new, skip_special_tokens=True)
    return {
        "correct": all(value in text for value in sample["expected"]),
        "kv_bytes": held,
        "layer_bytes": per_layer,
        "prefill_s": prefill_s,
        "decode_ms": 1000 * decode_s / max(1, len(new)),
        "compression_ratio": _ratio(press),
        "text": text,
    }


def _ratio(press: Any) -> float | None:
    """The compression ratio the press reports after a prefill (DuoAttention computes its own)."""
    if press is None:
        return 0.0
    try:
        return float(press.compression_ratio)
    except (AssertionError, AttributeError, TypeError):
        return None


def _rows(args: argparse.Namespace, sliding: list[bool]) -> list[tuple[str, Any]]:
    """``(label, press factory)`` for every row, ``full`` first. A factory takes the full row's
    bytes per layer: with sliding layers the token presses' ratio is set on the global layers so
    that the whole cache keeps fraction F (:func:`global_ratio`)."""
    fractions = [float(f) for f in args.fractions.split(",")]
    rows: list[tuple[str, Any]] = [("full", lambda full: None)]

    def token_press(name: str, f: float, full: list[int]) -> Any:
        ratio = 1 - f if not any(sliding) else global_ratio(f, full, sliding)
        if ratio is None:
            raise SystemExit(f"{name} {f:g}: the sliding layers alone hold more than {f:g} of the KV bytes")
        return _press(name, ratio, args)

    for name in [p for p in args.presses.split(",") if p]:
        for f in fractions:
            rows.append((f"{name} {f:g}", lambda full, name=name, f=f: token_press(name, f, full)))
    for spec in args.duo:
        f, directory = spec.split("=", 1)
        rows.append((f"DuoAttentionPress {float(f):g}", lambda full, d=directory: _duo_press(d)))
    return rows


def _cell(records: list[dict[str, Any]], full_bytes: list[int]) -> dict[str, Any]:
    """Means over one row's samples (KV kept: per sample against the full cache of that sample)."""
    n = len(records)
    ratios = [r["compression_ratio"] for r in records]
    return {
        "n": n,
        "accuracy": round(100 * sum(r["correct"] for r in records) / n, 1),
        "kv_mib": round(sum(r["kv_bytes"] for r in records) / n / 2**20, 3),
        "kv_kept": round(sum(r["kv_bytes"] / b for r, b in zip(records, full_bytes, strict=True)) / n, 4),
        "prefill_s": round(sum(r["prefill_s"] for r in records) / n, 3),
        "decode_ms": round(sum(r["decode_ms"] for r in records) / n, 2),
        "press_ratio": None if None in ratios else round(sum(ratios) / n, 4),
    }


def main() -> None:
    """Run every sample through every row and print / write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks-file", help="JSON written by bench_kv.py --export-tasks")
    parser.add_argument("--model-dir", help="local Hugging Face model directory (no hub access)")
    parser.add_argument("--presses", default=",".join(PRESSES))
    parser.add_argument("--fractions", default="0.5,0.25,0.125", help="KV kept; compression_ratio = 1 - F")
    parser.add_argument(
        "--duo", action="append", default=[], metavar="F=DIR", help="DuoAttention pattern dir"
    )
    parser.add_argument("--tasks", default=None, help="only these tasks of the file (comma-separated)")
    parser.add_argument("--sink", type=int, default=4, help="StreamingLLMPress n_sink")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--summary", default=None, metavar="JSON", help="only print the table of a written JSON"
    )
    parser.add_argument(
        "--first", type=int, default=None, help="with --summary: the first N samples per task"
    )
    parser.add_argument(
        "--start", type=int, default=0,
        help="skip the first K samples of each task (run the rest; --summary A,B merges runs)",
    )  # fmt: skip
    parser.add_argument("--count", type=int, default=None, help="run at most N samples of each task")
    args = parser.parse_args()
    if args.summary:
        results = _merged([json.loads(Path(f).read_text()) for f in args.summary.split(",")])
        if args.first:
            cut = {
                key: {label: recs[: args.first] for label, recs in cell.items()}
                for key, cell in results["samples"].items()
            }
            _collect(results, cut)
        _summary(results)
        if args.json:  # the merged (or cut) result
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    if not args.tasks_file or not args.model_dir:
        parser.error("--tasks-file and --model-dir are required (unless --summary)")
    quiet_kvpress()
    torch.set_num_threads(args.threads)
    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = json.loads(Path(args.tasks_file).read_text())
    samples = [s for s in data["samples"] if args.tasks is None or s["task"] in args.tasks.split(",")]
    seen: dict[str, int] = {}
    for sample in samples:  # its index within its task and length
        key = f"{sample['task']} {sample['length']}"
        sample["index"], seen[key] = seen.get(key, 0), seen.get(key, 0) + 1
    stop = args.start + args.count if args.count is not None else None
    samples = [s for s in samples if s["index"] >= args.start and (stop is None or s["index"] < stop)]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    rows = _rows(args, _sliding(model))
    results: dict[str, Any] = {
        "model_dir": args.model_dir, "tasks_file": args.tasks_file, "seed": data.get("seed"),
        "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else _version("kvpress"),
        "transformers": transformers.__version__, "torch": torch.__version__, "cpu": cpu_model(),
        "cores": usable_cores(), "threads": args.threads, "rss_after_load_mib": current_rss_mib(),
        "cells": {}, "samples": {},
    }  # fmt: skip
    wall = time.perf_counter()
    records: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for sample in _interleaved(samples):
        key = f"{sample['task']} {sample['length']}"
        full: list[int] = []
        for label, make in rows:
            record = run_sample(model, tokenizer, sample, make(full))
            full = full or record["layer_bytes"]
            records.setdefault(key, {}).setdefault(label, []).append(record)
        _collect(results, records)
        results["wall_s"] = round(time.perf_counter() - wall, 1)
        print(
            json.dumps({key: {label: recs[-1]["correct"] for label, recs in records[key].items()}}),
            flush=True,
        )
        if args.json:  # written after every sample, so an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=1))
    _summary(results)


def _interleaved(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples in rounds (first of every task, then the second, ...) so a cut-short run is balanced."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_task.setdefault(f"{sample['task']} {sample['length']}", []).append(sample)
    rounds = max(len(group) for group in by_task.values())
    return [group[i] for i in range(rounds) for group in by_task.values() if i < len(group)]


def _collect(results: dict[str, Any], records: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """Fill ``results`` with per-cell means and every sample's answer and measures."""
    for key, by_label in records.items():
        full_bytes = [r["kv_bytes"] for r in by_label["full"]]
        results["cells"][key] = {label: _cell(recs, full_bytes) for label, recs in by_label.items()}
        results["samples"][key] = by_label


def _merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs on consecutive samples (``--start``): samples concatenated per cell and
    row in the order given, cells recomputed; the first run's metadata, the walls summed."""
    if len(runs) == 1:
        return runs[0]
    merged = {**runs[0], "cells": {}, "samples": {}, "merged": len(runs)}
    records: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        for key, by_label in run["samples"].items():
            for label, recs in by_label.items():
                records.setdefault(key, {}).setdefault(label, []).extend(recs)
    merged["wall_s"] = round(sum(run.get("wall_s", 0.0) for run in runs), 1)
    _collect(merged, records)
    return merged


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def quiet_kvpress() -> None:
    """Silence transformers (``benchlib.quiet``) and kvpress's per-model warnings."""
    import logging

    quiet()
    logging.getLogger("kvpress").setLevel(logging.ERROR)


def _summary(results: dict[str, Any]) -> None:
    """Print one Markdown table: per row, accuracy per cell, then means of the other columns."""
    cells = results["cells"]
    labels = list(next(iter(cells.values())))
    full_decode = sum(c["full"]["decode_ms"] for c in cells.values()) / len(cells)
    print(f"\n{results['model_dir']}; cells: {', '.join(cells)}; wall {results['wall_s']} s")
    print(
        f"| press | n | {' | '.join(cells)} | KV kept | KV MiB after prefill | prefill s | decode ms/token | decode vs full |"
    )
    print("|---|" + "---:|" * (len(cells) + 6))
    for label in labels:
        rows = [c[label] for c in cells.values()]

        def mean(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return sum(r[key] for r in rows) / len(rows)

        accs = " | ".join(f"{r['accuracy']:.0f}" for r in rows)
        print(
            f"| {label} | {sum(r['n'] for r in rows)} | {accs} | {100 * mean('kv_kept'):.1f} % | {mean('kv_mib'):.2f} | {mean('prefill_s'):.2f} | "
            f"{mean('decode_ms'):.1f} | {full_decode / mean('decode_ms'):.2f}× |"
        )


if __name__ == "__main__":
    main()
