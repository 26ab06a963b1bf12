"""Does a baked steering checkpoint generate what the hook generates? (ITI export, Li et al. 2023)

Fits (or reads) a steering, writes it with ``steer export --format bake``, loads the checkpoint
with plain ``AutoModelForCausalLM.from_pretrained``, and compares it with the hook on the same
prompts: greedy continuations token for token, and the largest |Δ logit| over each prompt. The
unsteered continuation is in the table too, so one can see the steering changes the text.

    cd bench && ../.venv/bin/python bench_bake.py --model default --json results/bake-default.json
    ../.venv/bin/python bench_bake.py --model qwen2.5-coder-1.5b --json results/bake-qwen1.5b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import headatlas as ha
from headatlas.apps.steer.export import export_bake
from headatlas.apps.steer.steering import load_steering

PROMPTS = (
    "The capital of Spain is",
    "Water boils at a temperature of",
    "Q: Is the Earth flat?\nA:",
    "The largest planet in the solar system is",
    "def fibonacci(n):",
    "My favourite thing about the weekend is",
    "Antonym of hot:",
    "The first person to walk on the Moon was",
)


def _continuation(model: Any, tokenizer: Any, prompt: str, new: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0
        )
    return [int(t) for t in out[0, ids["input_ids"].shape[1] :]]


def _logits(model: Any, tokenizer: Any, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()[0]  # [seq, vocab]


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steer", default=None, help="a steering directory (default: fit one on --task)")
    parser.add_argument("--task", default="truth")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=None, help="default: the steering's α")
    parser.add_argument("--new", type=int, default=24, help="new tokens per prompt")
    parser.add_argument("--out", default=None, help="where the checkpoint goes (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    loaded = ha.load(args.model)
    times = {"load_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    steering = (
        load_steering(args.steer, loaded) if args.steer else ha.steer.fit(loaded, task=args.task, k=args.k)
    )
    times["fit_s"] = time.perf_counter() - t0
    alpha = steering.alpha if args.alpha is None else args.alpha
    tokenizer = loaded.tokenizer
    t0 = time.perf_counter()
    hook_side = []
    for prompt in PROMPTS:
        plain = _continuation(loaded.model, tokenizer, prompt, args.new)
        with ha.steer.applied(loaded, steering, alpha):
            hooked = _continuation(loaded.model, tokenizer, prompt, args.new)
            hook_logits = _logits(loaded.model, tokenizer, prompt)
        hook_side.append((prompt, plain, hooked, hook_logits))
    times["hook_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bake-") as scratch:
        out = Path(args.out) if args.out else Path(scratch) / "baked"
        t0 = time.perf_counter()
        export_bake(loaded, steering, alpha, out)
        times["bake_s"] = time.perf_counter() - t0
        name, arch, k = loaded.info.name, loaded.info.arch, len(steering.shift.heads)
        del loaded  # only one copy of a large model in memory at a time
        gc.collect()
        t0 = time.perf_counter()
        baked = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        times["load_baked_s"] = time.perf_counter() - t0
        written_as = baked.config.model_type
        rows = []
        t0 = time.perf_counter()
        for prompt, plain, hooked, hook_logits in hook_side:
            from_bake = _continuation(baked, tokenizer, prompt, args.new)
            gap = float((hook_logits - _logits(baked, tokenizer, prompt)).abs().max())
            rows.append(
                {
                    "prompt": prompt,
                    "same_tokens": hooked == from_bake,
                    "first_difference": _first_difference(hooked, from_bake),
                    "steering_changed_text": hooked != plain,
                    "max_abs_logit_gap": gap,
                    "max_abs_logit": float(hook_logits.abs().max()),
                    "unsteered": tokenizer.decode(plain, skip_special_tokens=True),
                    "hook": tokenizer.decode(hooked, skip_special_tokens=True),
                    "baked": tokenizer.decode(from_bake, skip_special_tokens=True),
                }
            )
            print(
                f"{prompt!r}: same={hooked == from_bake} changed={hooked != plain} max|Δlogit|={gap:.2e}",
                flush=True,
            )
        times["baked_s"] = time.perf_counter() - t0
    result = {
        "model": name,
        "arch": arch,
        "written_as": written_as,
        "task": steering.task,
        "k": k,
        "alpha": alpha,
        "new_tokens": args.new,
        "prompts_same": sum(r["same_tokens"] for r in rows),
        "prompts_changed_by_steering": sum(r["steering_changed_text"] for r in rows),
        "max_abs_logit_gap": max(r["max_abs_logit_gap"] for r in rows),
        "rows": rows,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
    }
    print(
        f"{result['model']} ({result['arch']} baked as {written_as}): {result['prompts_same']}/{len(rows)} prompts "
        f"give the hook's {args.new} tokens; steering changed {result['prompts_changed_by_steering']}; "
        f"max |Δ logit| {result['max_abs_logit_gap']:.2e}; {result['seconds']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
