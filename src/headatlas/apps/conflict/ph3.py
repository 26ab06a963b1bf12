"""Memory heads, context heads and PH3 (Jin et al. 2024, "Cutting Off the Head Ends the Conflict: A
Mechanism for Interpreting and Mitigating Knowledge Conflicts in Language Models").

**Score.** On a conflict prompt (:mod:`.items`) a head's *direct contribution* is what its output at
the last position adds, through the direct path to the logits, to

    logit(memory answer) − logit(context answer)

— its slice of the output projection, the final norm with its per-position scale frozen at the
real residual's (:mod:`headatlas.capture.residual`), and the unembedding (direct logit attribution,
Elhage et al. 2021; Jin et al. find the heads by path patching into the logits, which is this direct
path measured causally). The atlas column ``conflict`` is the mean over the conflict set, in
logits: positive for **memory heads** (they push the memorised answer), negative for **context
heads** (they push the answer the context gives). Summed over every head of every layer it is the
whole direct contribution of attention (minus output-projection biases) to the logit difference.

**PH3.** Pruning the top-``k`` heads of one side moves the model to the other: prune context heads
to make it answer from memory (``prefer="memory"``), memory heads to make it follow the context
(``prefer="context"``). Heads are scored on one half of the facts and the rates are measured on the
other half, before and after silencing the heads (zero ablation, which is what removing them from
the weights does), against ``k`` random heads over several seeds. The paper reports, over eight
models, memory use up by 44.0 % and context use up by 38.5 %.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...atlas.table import Atlas
from ...batteries.base import ProbeSequence, make_batch, pad_id
from ...capture import ablate, head_outputs, output_projections, output_weight, padded_positions
from ...capture.residual import final_residual, norm_scale
from ...core.errors import HeadatlasError, check_at_least, check_choice
from ...core.heads import HEAD_SET_FORMAT, Head, head_name
from ...core.progress import Progress, no_progress
from ...core.storage import write_json
from ...functional.logit_lens import logit_lens, project_rows
from ...model.archs import arch_spec
from ...model.info import LoadedModel
from ..common.evaluation import next_token_logits
from .items import ConflictItem, conflict_items, split_items

PREFER = ("memory", "context")
"""Which source PH3 makes the model follow."""
PAPER = {"memory": 44.0, "context": 38.5}
"""Jin et al. 2024's average gains (memory use, context use), in percent, over eight models."""


def _attn_out_scales(loaded: LoadedModel) -> dict[int, torch.nn.Module]:
    """Layers whose attention output passes a norm before the residual (Gemma's sandwich norm)."""
    name = arch_spec(loaded.info.arch).attn_out_norm
    if name is None:
        return {}
    layers = getattr(loaded.model.base_model, "layers", None) or []
    return {i: getattr(block, name) for i, block in enumerate(layers) if hasattr(block, name)}


def direct_contributions(
    loaded: LoadedModel, items: Sequence[ConflictItem], batch_size: int = 16, progress: Progress = no_progress
) -> torch.Tensor:
    """Return each head's direct contribution to ``logit(memory) − logit(context)`` at the last
    position of each item, ``[item, layer, head]`` in logits (Jin et al. 2024; Elhage et al. 2021's
    direct path with the final norm's scale frozen)."""
    info = loaded.info
    lens = logit_lens(loaded)
    sandwich = _attn_out_scales(loaded)
    weights = {layer: output_weight(p).float() for layer, p in output_projections(loaded).items()}
    out = torch.zeros(len(items), info.n_layers, info.n_heads)
    pad = pad_id(loaded.tokenizer)
    chunks = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    done = 0
    seen: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor, diff: torch.Tensor) -> None:
        last = z[:, -1].float()  # [batch, head, d_head]
        rows = project_rows(lens, layer, diff)  # [batch, head, d_head]
        value = (last * rows).sum(-1)  # [batch, head]
        if layer in sandwich:  # Gemma: the attention output is normed before the residual
            o = last.flatten(1) @ weights[layer].t()  # [batch, d_model]
            value = value / norm_scale(sandwich[layer], o.to(z.dtype))[:, None]
        seen[layer] = value

    with head_outputs(loaded, keep) as tap, final_residual(loaded) as residual, torch.no_grad():
        for chunk in chunks:
            memory = torch.tensor([i.memory_token for i in chunk], device=loaded.device)
            context = torch.tensor([i.context_token for i in chunk], device=loaded.device)
            tap.context = (lens.unembed[memory] - lens.unembed[context]).float()  # [batch, d_model]
            batch = make_batch([ProbeSequence(i.ids) for i in chunk], pad)
            mask = batch.attention_mask.to(loaded.device)  # [batch, seq]
            seen.clear()
            loaded.model(
                input_ids=batch.input_ids.to(loaded.device),
                attention_mask=mask,
                **padded_positions(loaded.model, mask),
            )
            scale = residual.scale()[:, -1]  # [batch]
            for layer, value in seen.items():
                out[done : done + len(chunk), layer] = (value / scale[:, None]).cpu()
            done += len(chunk)
            progress(done, len(items))
    return out


@dataclass(frozen=True)
class Usage:
    """How often the model answers from memory, from the context, or neither (next-token argmax)."""

    memory: float
    context: float
    other: float
    logit_diff: float
    """Mean ``logit(memory) − logit(context)``."""
    n: int


def usage(
    loaded: LoadedModel, items: Sequence[ConflictItem], heads: Sequence[Head] = (), batch_size: int = 16
) -> Usage:
    """Return the memory / context use rates on ``items`` with ``heads`` zero-ablated (none: the model)."""
    if not items:
        raise HeadatlasError("no conflict items to measure")
    with ablate(loaded, list(heads)):
        logits = next_token_logits(loaded, [i.ids for i in items], batch_size)  # [n, vocab]
    top = logits.argmax(-1)
    memory = torch.tensor([i.memory_token for i in items], device=logits.device)
    context = torch.tensor([i.context_token for i in items], device=logits.device)
    mem = (top == memory).float().mean().item()
    ctx = (top == context).float().mean().item()
    rows = torch.arange(len(items), device=logits.device)
    diff = (logits[rows, memory] - logits[rows, context]).mean().item()
    return Usage(mem, ctx, 1.0 - mem - ctx, diff, len(items))


def top_heads(scores: np.ndarray, prefer: str, k: int) -> list[Head]:
    """Return the ``k`` heads PH3 prunes to make the model follow ``prefer``: the most negative
    ``conflict`` scores (context heads) for ``memory``, the most positive (memory heads) for ``context``."""
    check_choice("prefer", prefer, PREFER)
    flat = scores.reshape(-1)
    order = np.argsort(flat if prefer == "memory" else -flat, kind="stable")[:k]
    n_heads = scores.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[Head]:
    """Return ``k`` heads drawn uniformly without replacement from all heads (seeded)."""
    flat = random.Random(seed).sample(range(n_layers * n_heads), k)
    return [(i // n_heads, i % n_heads) for i in flat]


@dataclass
class PH3Result:
    """What :func:`ph3` measured (written as the head-set file by :func:`write_head_set`)."""

    model: str
    prefer: str
    k: int
    heads: list[str]
    n_score: int
    n_test: int
    before: dict[str, float]
    after: dict[str, float]
    random: list[dict[str, Any]]
    scores: np.ndarray
    std: np.ndarray
    seconds: float

    @property
    def gain(self) -> float:
        """Points gained on the preferred rate by pruning the top heads."""
        return 100 * (self.after[self.prefer] - self.before[self.prefer])

    @property
    def random_gain(self) -> tuple[float, float]:
        """Mean and std over seeds of the points gained with ``k`` random heads."""
        gains = [100 * (r["usage"][self.prefer] - self.before[self.prefer]) for r in self.random]
        return float(np.mean(gains)), float(np.std(gains))

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready head set and measurements (no score matrices)."""
        mean, std = self.random_gain
        return {
            "format": HEAD_SET_FORMAT,
            "model": self.model,
            "heads": self.heads,
            "method": "PH3 (Jin et al. 2024): prune the top heads of one side of the conflict",
            "prefer": self.prefer,
            "k": self.k,
            "n_score_items": self.n_score,
            "n_test_items": self.n_test,
            "before": self.before,
            "after": self.after,
            "gain_points": self.gain,
            "random": self.random,
            "random_gain_points": {"mean": mean, "std": std},
            "paper_gain_points": PAPER[self.prefer],
            "seconds": self.seconds,
        }


def ph3(
    loaded: LoadedModel,
    prefer: str = "memory",
    k: int = 5,
    seeds: int = 5,
    seed: int = 0,
    progress: Progress = no_progress,
) -> PH3Result:
    """Return PH3 (Jin et al. 2024) on ``loaded``: heads scored on half of its conflict set, the top
    ``k`` of the side opposite to ``prefer`` pruned, rates on the other half against ``seeds`` draws
    of ``k`` random heads."""
    check_choice("prefer", prefer, PREFER)
    info = loaded.info
    check_at_least("k", k, 1)
    check_at_least("seeds", seeds, 0)
    if k > info.n_layers * info.n_heads:
        raise HeadatlasError(f"k = {k} is more than the model's {info.n_layers * info.n_heads} heads")
    start = time.perf_counter()
    score_items, test_items = split_items(conflict_items(loaded, seed), seed)
    contrib = direct_contributions(loaded, score_items)  # [item, layer, head]
    scores, std = contrib.mean(0).numpy(), contrib.std(0).numpy()
    chosen = top_heads(scores, prefer, k)
    total = seeds + 2
    before = usage(loaded, test_items)
    progress(1, total)
    after = usage(loaded, test_items, chosen)
    progress(2, total)
    randoms = []
    for s in range(seeds):
        heads = random_heads(info.n_layers, info.n_heads, k, seed * 1000 + s + 1)
        randoms.append(
            {
                "seed": s,
                "heads": [head_name(*h) for h in heads],
                "usage": asdict(usage(loaded, test_items, heads)),
            }
        )
        progress(3 + s, total)
    return PH3Result(
        info.name,
        prefer,
        k,
        [head_name(*h) for h in chosen],
        len(score_items),
        len(test_items),
        asdict(before),
        asdict(after),
        randoms,
        scores,
        std,
        time.perf_counter() - start,
    )


def write_head_set(result: PH3Result, out: str | Path) -> Path:
    """Write ``result`` as a head-set JSON file (atomically); return its path."""
    return write_json(Path(out), result.to_dict())


def write_conflict(atlas: Atlas, result: PH3Result) -> None:
    """Add the ``conflict`` column (mean direct contribution, logits) with its std and count to
    ``atlas``, the run's facts to its metadata, and recompute the roles."""
    atlas.set_matrix("conflict", result.scores)
    atlas.set_matrix("conflict_std", result.std)
    atlas.set_matrix("conflict_n", np.full(result.scores.shape, result.n_score))
    meta = result.to_dict()
    atlas.meta["conflict"] = {
        key: meta[key] for key in ("prefer", "k", "heads", "n_score_items", "before", "after")
    }
    atlas.reassign_roles()
