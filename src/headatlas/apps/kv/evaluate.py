"""``kv eval``: accuracy, KV bytes really held, prefill time and decode speed of a KV plan on the
RULER-style tasks of :mod:`.tasks`, against the plain cache on the same prompts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...model.compat import cache_kwargs
from .cache import layer_nbytes
from .plan import Plan
from .tasks import Sample


@dataclass
class Row:
    """One configuration's results over a list of samples (means over samples)."""

    label: str
    n: int = 0
    correct: int = 0
    kv_bytes: float = 0.0
    prefill_s: float = 0.0
    decode_ms: float = 0.0
    outputs: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Percent of samples whose answer holds every expected string."""
        return 100.0 * self.correct / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (outputs left out)."""
        return {
            "label": self.label,
            "n": self.n,
            "accuracy": round(self.accuracy, 2),
            "kv_bytes_after_prefill": int(self.kv_bytes),
            "prefill_s": round(self.prefill_s, 4),
            "decode_ms_per_token": round(self.decode_ms, 3),
        }


def encode(tokenizer: Any, sample: Sample) -> torch.Tensor:
    """``[1, seq]`` token ids of a sample's prompt (its chat template text already holds special tokens)."""
    special = not getattr(tokenizer, "chat_template", None)
    return torch.tensor([tokenizer(sample.prompt, add_special_tokens=special)["input_ids"]])


def run_one(
    loaded: Any,
    sample: Sample,
    kv_plan: Plan | None,
    *,
    streaming_prefill: bool = False,
    chunk: int | None = None,
) -> tuple[str, int, float, float]:
    """Prefill and answer one sample; return ``(text, KV bytes after prefill, prefill s, decode ms/token)``.

    ``kv_plan=None`` is transformers' plain ``DynamicCache`` with the model's own attention.
    ``chunk`` (default: the whole prompt) is the prefill chunk length.
    """
    from transformers import DynamicCache

    from . import compressed, prefill

    ids = encode(loaded.tokenizer, sample).to(loaded.device)
    model = loaded.model
    cm: Any
    if kv_plan is None:
        import contextlib

        cm = contextlib.nullcontext(DynamicCache(config=model.config))
    else:
        cm = compressed(loaded, kv_plan, streaming_prefill=streaming_prefill, length=ids.shape[1])
    with cm as cache, torch.no_grad():
        start = time.perf_counter()
        prefill(loaded, cache, ids, chunk=chunk or ids.shape[1])
        prefill_s = time.perf_counter() - start
        held = sum(layer_nbytes(layer) for layer in cache.layers)
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_kwargs(model, cache),
            max_new_tokens=sample.max_new_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id,
        )
        decode = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    text = loaded.tokenizer.decode(new, skip_special_tokens=True)
    return text, held, prefill_s, 1000 * decode / max(1, len(new))


def evaluate(
    loaded: Any,
    samples: list[Sample],
    kv_plan: Plan | None,
    label: str,
    *,
    streaming_prefill: bool = False,
    chunk: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Row:
    """Run every sample through one configuration and return its :class:`Row`."""
    row = Row(label)
    for i, sample in enumerate(samples):
        text, held, pre, dec = run_one(
            loaded, sample, kv_plan, streaming_prefill=streaming_prefill, chunk=chunk
        )
        row.n += 1
        row.correct += sample.correct(text)
        row.kv_bytes += (held - row.kv_bytes) / row.n
        row.prefill_s += (pre - row.prefill_s) / row.n
        row.decode_ms += (dec - row.decode_ms) / row.n
        row.outputs.append(text)
        if progress is not None:
            progress(i + 1, len(samples))
    return row
