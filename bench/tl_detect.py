"""TransformerLens side of ``bench_capture.py``: time or measure ``detect_head`` on given token ids.

Runs in its own virtual environment (TransformerLens is no dependency of headatlas), e.g.::

    python3 -m venv /tmp/tl-venv
    /tmp/tl-venv/bin/pip install torch==2.13.0
    /tmp/tl-venv/bin/pip install -c <(echo torch==2.13.0) transformer-lens==3.9.0

and is started by ``bench_capture.py`` as a subprocess with that venv's python. It prints one
line ``TL_RESULT {json}``.

Models (built without any download):

- ``gpt2``: a random-init ``HookedTransformer`` of GPT-2-small shape (12 layers × 12 heads,
  d_model 768, d_mlp 3072, vocab 50257, LayerNorm, gelu_new, learned positions), seed 0.
- ``default``: headatlas' packaged SmolLM2-135M from its local fp32 Hugging Face directory, through
  TransformerLens' own loaders (``get_pretrained_model_config`` / ``get_pretrained_state_dict``
  accept a local directory with ``config.json``; ``HookedTransformer.from_pretrained`` itself only
  takes official model names). Weights are loaded unprocessed (no LayerNorm folding), so the
  model is the Hugging Face one.

``detect_head`` takes strings, not token ids. To feed it exactly the token ids headatlas scans,
the model gets a word-level tokenizer whose word ``t<i>`` is token ``i`` (built in memory with
``tokenizers``), and ``default_prepend_bos`` is off: each sequence is the string
``"t<id0> t<id1> ..."``, which tokenizes back to the same ids (checked). Tokenising is a
negligible part of the time.

Two variants, all three built-in detectors (previous_token_head, duplicate_token_head,
induction_head) on every sequence:

- ``documented``: ``detect_head(model, [seq, ...], name)`` once per detector, as the docstring
  shows: each call tokenises and runs the model itself (``run_with_cache`` of every hook), one
  sequence at a time, and averages the scores over sequences.
- ``shared``: per sequence one ``run_with_cache(tokens, remove_batch_dim=True, return_type=None,
  names_filter=<attention patterns only>)`` (no LM head, only the tensors the detectors read),
  then the three ``detect_head(..., cache=cache)`` calls on it. ``detect_head`` accepts a cache
  only for one prompt (a cache with the batch dimension removed), hence one run per sequence.

Gradients are off (``torch.set_grad_enabled(False)``, as TransformerLens' demos do).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from benchlib import current_rss_mib as _current_rss_mib
from benchlib import maxrss_mib as _maxrss_mib
from benchlib import peak_since_reset_mib as _peak_since_reset_mib
from benchlib import reset_peak_rss as _reset_peak_rss

MARKER = "TL_RESULT "
VARIANTS = ("documented", "shared")


def _word_tokenizer(vocab_size: int) -> Any:
    """A fast tokenizer mapping the word ``t<i>`` to id ``i`` (no BOS; EOS/pad = last id)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = Tokenizer(WordLevel(vocab, unk_token=f"t{vocab_size - 1}"))
    core.pre_tokenizer = WhitespaceSplit()
    last = f"t{vocab_size - 1}"
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=last, pad_token=last, unk_token=last)


def _build(model_kind: str, model_path: str | None, n_ctx: int) -> Any:
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if model_kind == "gpt2":
        cfg = HookedTransformerConfig(
            n_layers=12,
            d_model=768,
            n_heads=12,
            d_head=64,
            d_mlp=3072,
            d_vocab=50257,
            n_ctx=n_ctx,
            act_fn="gelu_new",
            normalization_type="LN",
            positional_embedding_type="standard",
            default_prepend_bos=False,
            seed=0,
            device="cpu",
            dtype=torch.float32,
        )
        return HookedTransformer(cfg, _word_tokenizer(50257))
    import transformer_lens.loading_from_pretrained as loading

    if not model_path:
        raise SystemExit("--model-path is needed for the default model")
    cfg = loading.get_pretrained_model_config(model_path, fold_ln=False, device="cpu", dtype=torch.float32)
    cfg.default_prepend_bos = False
    state = loading.get_pretrained_state_dict(model_path, cfg, None, dtype=torch.float32)
    model = HookedTransformer(cfg, _word_tokenizer(cfg.d_vocab))
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    del state
    return model


def _runners(model: Any, texts: list[str]) -> dict[str, Any]:
    import torch
    from transformer_lens.head_detector import HEAD_NAMES, detect_head

    def documented() -> torch.Tensor:
        scores = [detect_head(model, texts, name) for name in HEAD_NAMES]
        return torch.stack(scores)  # [detector, layer, head]

    def keep(name: str) -> bool:
        return name.endswith("attn.hook_pattern")

    def shared() -> torch.Tensor:
        per_seq = []
        for text in texts:
            tokens = model.to_tokens(text)
            _, cache = model.run_with_cache(
                tokens, remove_batch_dim=True, return_type=None, names_filter=keep
            )
            per_seq.append(torch.stack([detect_head(model, text, name, cache=cache) for name in HEAD_NAMES]))
            del cache
        return torch.stack(per_seq).mean(0)  # [detector, layer, head]

    return {"documented": documented, "shared": shared}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("default", "gpt2"), required=True)
    parser.add_argument("--model-path", default=None, help="local HF dir of the default model")
    parser.add_argument("--ids", required=True, help="JSON file: {'ids': [[token, ...], ...]}")
    parser.add_argument("--n-ctx", type=int, default=2049, help="context of the GPT-2-shaped model")
    parser.add_argument("--mode", choices=("time", "memory"), default="time")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help="memory mode: which variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="time mode: which variants")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import logging
    import warnings

    import torch
    import transformer_lens
    import transformers

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with open(args.ids) as fh:
        ids: list[list[int]] = json.load(fh)["ids"]
    model = _build(args.model, args.model_path, args.n_ctx)
    model.eval()
    texts = [" ".join(f"t{i}" for i in row) for row in ids]
    for text, row in zip(texts, ids, strict=True):
        got = model.to_tokens(text)[0].tolist()
        if got != row:
            raise SystemExit("the word-level tokenizer did not reproduce the token ids")
    runners = _runners(model, texts)
    import gc

    gc.collect()
    info: dict[str, Any] = {
        "model": args.model,
        "batch": len(ids),
        "seq_len": len(ids[0]),
        "n_layers": model.cfg.n_layers,
        "n_heads": model.cfg.n_heads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": getattr(transformer_lens, "__version__", None)
        or _dist_version("transformer-lens"),
        "threads": torch.get_num_threads(),
    }
    if args.mode == "memory":
        if args.variant is None:
            raise SystemExit("--mode memory needs --variant")
        info["variant"] = args.variant
        info["rss_after_load_mib"] = _current_rss_mib()
        info["load_peak_rss_mib"] = _maxrss_mib()
        info["peak_reset_after_load"] = _reset_peak_rss()
        t0 = time.perf_counter()
        runners[args.variant]()
        info["run_s"] = time.perf_counter() - t0
        info["peak_rss_mib"] = _peak_since_reset_mib() if info["peak_reset_after_load"] else _maxrss_mib()
        info["ru_maxrss_mib"] = _maxrss_mib()
    else:
        variants = [v for v in args.variants.split(",") if v]
        # Warm-up on the first 64 tokens of each sequence: enough to pay the one-time costs
        # (the full length would only add minutes), and to check both variants agree.
        short = _runners(model, [" ".join(t.split()[:64]) for t in texts])
        results = {v: short[v]() for v in variants}
        if len(variants) == 2:
            info["max_abs_diff_documented_vs_shared_warmup"] = float(
                (results["documented"] - results["shared"]).abs().max()
            )
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                t0 = time.perf_counter()
                runners[v]()
                times[v].append(time.perf_counter() - t0)
        info["times_s"] = times
        info["median_s"] = {v: statistics.median(t) for v, t in times.items()}
        info["load_average"] = os.getloadavg()
    print(MARKER + json.dumps(info), flush=True)
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
