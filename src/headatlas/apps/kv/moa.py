"""``kv fit --method moa``: a window per KV head from elastic rules, chosen by profiled sensitivity.

MoA (Fu et al. 2024, "Mixture of Sparse Attention for Automatic Large Language Model
Compression") gives every head its own sliding window ``alpha + beta · N`` (``N`` the input
length), picked from a small grid of ``(alpha, beta)`` rules: it profiles how much the loss would
change if each head dropped the keys outside each rule (first-order, through the gradient with
respect to the attention matrix: :mod:`headatlas.apps.kv.backends.moa`), then picks one rule per
head minimising the summed change under a memory budget. Here the unit is the KV head (the cache's
unit; a KV head's cost is the sum over its query heads), the budget is the binary plans' (a share
of the full cache's KV bytes at ``context`` tokens, :func:`.plan.plan`), the choice is an exact
multiple-choice knapsack by dynamic programming over whole tokens, and "keep every token" is one
more choice at cost 0. The profile prompts are ``kv fit``'s (niah and multikey prompts of their
own seed stream, each followed by its answer, the loss the cross-entropy of the answer's tokens).
``sensitivity="mass"`` is the training-free variant: the attention mass the head puts outside the
rule's keys on the answer-predicting rows (no gradient).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...core.errors import HeadatlasError, check_at_least, param
from ...model.compat import attention_implementation
from ...model.info import LoadedModel
from .backends import moa as backend_moa
from .fit import _teacher_forced, loss_positions
from .plan import Plan, check_plan_settings, span_window
from .tasks import check_tasks

ALPHAS = (16, 32, 64, 128, 256, 512)
BETAS = (0.0, 0.0625, 0.125, 0.25, 0.5)
SENSITIVITIES = ("grad", "mass")
_POS_BYTES = 8  # one int64 position per ring slot (the ring's bookkeeping, counted in the budget)


@dataclass
class MoaProfile:
    """Per ``[layer, kv_head, rule]``: MoA's loss estimate (``grad``) and the attention mass outside
    the rule (``mass``), means over the prompts; ``length`` the mean prompt tokens profiled."""

    rules: list[tuple[float, float]]
    grad: np.ndarray
    mass: np.ndarray
    length: int
    seconds: float
    settings: dict[str, Any]

    def costs(self, sensitivity: str) -> np.ndarray:
        """The ``[layer, kv_head, rule]`` costs the knapsack minimises."""
        return self.grad if sensitivity == "grad" else self.mass


def rule_grid(alphas: Sequence[float], betas: Sequence[float]) -> list[tuple[float, float]]:
    """Every ``(alpha, beta)`` pair of the two grids, in order."""
    return [(float(a), float(b)) for a in alphas for b in betas]


def check_moa_settings(
    seq_len: int, n_prompts: int, sink: int, alphas: Sequence[float], betas: Sequence[float],
    tasks: Sequence[str], sensitivity: str,
) -> None:  # fmt: skip
    """Raise :class:`HeadatlasError` naming the first of :func:`profile_heads`' settings that cannot
    work, before any work."""
    check_at_least("n_prompts", n_prompts, 1)
    check_at_least("seq_len", seq_len, 64)
    check_at_least("sink", sink, 0)
    if not alphas or not betas or min(alphas) < 0 or min(betas) < 0 or max(betas) >= 1:
        raise HeadatlasError(
            f"{param('alphas')} must be ≥ 0 and {param('betas')} in [0, 1), at least one of each"
        )
    if max(alphas) < 1 and min(betas) == 0:
        raise HeadatlasError(f"{param('alphas')}: a rule with alpha < 1 and beta 0 keeps no token")
    if sensitivity not in SENSITIVITIES:
        raise HeadatlasError(f"{param('sensitivity')} must be grad or mass, got {sensitivity!r}")
    check_tasks(tasks)


def profile_heads(
    loaded: LoadedModel,
    *,
    seq_len: int = 512,
    n_prompts: int = 16,
    sink: int = 4,
    alphas: Sequence[float] = ALPHAS,
    betas: Sequence[float] = BETAS,
    seed: int = 0,
    tasks: Sequence[str] = ("niah", "multikey"),
    on_prompt: Callable[[int], None] | None = None,
) -> MoaProfile:
    """Return the :class:`MoaProfile` of every KV head and rule over ``n_prompts`` prompts of about
    ``seq_len`` tokens (one forward and backward each; Fu et al. 2024). The model is not changed."""
    loaded.info.require_one_stack("kv fit --method moa")
    check_moa_settings(seq_len, n_prompts, sink, alphas, betas, tasks, "grad")
    model, info = loaded.model, loaded.info
    rules = rule_grid(alphas, betas)
    prompts, answers = _teacher_forced(loaded.tokenizer, list(tasks), seq_len, n_prompts, seed)
    shape = (info.n_layers, info.n_kv_heads, len(rules))
    grad, mass = np.zeros(shape), np.zeros(shape)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    backend_moa.register()
    started = time.perf_counter()
    try:
        with attention_implementation(model, backend_moa.NAME):
            for i, (ids, (n_prompt, n_answer)) in enumerate(zip(prompts, answers, strict=True)):
                n = ids.shape[1]
                windows = [span_window(a, b, n) for a, b in rules]
                rows = loss_positions(n_prompt, n_answer, "answer")
                profile = backend_moa.Profile(windows, sink, rows)
                token = backend_moa.ACTIVE_PROFILE.set(profile)
                try:
                    ids = ids.to(loaded.device)
                    embeds = (
                        model.get_input_embeddings()(ids).detach().requires_grad_(True)
                    )  # [1, seq, d_model]
                    logits = model(inputs_embeds=embeds, logits_to_keep=n_answer + 1).logits[0, :n_answer]
                    loss = torch.nn.functional.cross_entropy(
                        logits.float(), ids[0, n_prompt : n_prompt + n_answer]
                    )
                    loss.backward()
                finally:
                    backend_moa.ACTIVE_PROFILE.reset(token)
                for layer in range(info.n_layers):
                    grad[layer] += _per_kv_head(profile.grad[layer], info.n_kv_heads)
                    mass[layer] += _per_kv_head(profile.mass[layer], info.n_kv_heads)
                if on_prompt is not None:
                    on_prompt(i + 1)
    finally:
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    settings = {
        "seq_len": seq_len,
        "n_prompts": n_prompts,
        "sink": sink,
        "seed": seed,
        "tasks": ",".join(tasks),
    }
    length = round(float(np.mean([p.shape[1] for p in prompts])))
    return MoaProfile(
        rules, grad / n_prompts, mass / n_prompts, length, time.perf_counter() - started, settings
    )


def _per_kv_head(values: torch.Tensor, n_kv_heads: int) -> np.ndarray:
    """``[head, rule]`` → ``[kv_head, rule]``: the sum over each KV group's query heads."""
    return values.reshape(n_kv_heads, -1, values.shape[-1]).sum(1).double().numpy()


def head_tokens(rule: tuple[float, float] | None, n_tokens: int, sink: int, per_token: int) -> int:
    """Return the budget a KV head takes at ``n_tokens`` (in whole tokens of ``per_token`` bytes):
    ``n_tokens`` for a full head (``rule`` None) or a window that would hold as much; otherwise the
    ring's ``sink + window + 1`` slots plus its positions and count, rounded up."""
    if rule is None:
        return n_tokens
    slots = sink + span_window(rule[0], rule[1], n_tokens) + 1
    if slots >= n_tokens:
        return n_tokens
    return math.ceil((slots * per_token + (slots - 1) * _POS_BYTES + 4) / per_token)


def solve(costs: np.ndarray, weights: np.ndarray, capacity: int) -> np.ndarray:
    """Return, per item, the choice minimising the summed ``costs [item, choice]`` with summed
    ``weights [item, choice]`` (whole numbers) at most ``capacity`` (an exact multiple-choice
    knapsack by dynamic programming; ties go to the earlier choice); ``-1`` entries if none fits."""
    n_items, n_choices = costs.shape
    best = np.zeros(capacity + 1)  # best[c]: least cost of the items so far within weight c
    picks = np.zeros((n_items, capacity + 1), dtype=np.int16)
    for item in range(n_items):
        new = np.full(capacity + 1, np.inf)
        for choice in range(n_choices):
            w = int(weights[item, choice])
            if w > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[w:] = best[: capacity + 1 - w] + costs[item, choice]
            better = cand < new
            new[better] = cand[better]
            picks[item, better] = choice
        best = new
    if not np.isfinite(best[capacity]):
        return np.full(n_items, -1)
    chosen = np.zeros(n_items, dtype=int)
    room = capacity
    for item in range(n_items - 1, -1, -1):
        chosen[item] = picks[item, room]
        room -= int(weights[item, chosen[item]])
    return chosen


def moa_plan(
    info: Any,
    rules: list[tuple[float, float]],
    costs: np.ndarray,
    *,
    keep_fraction: float,
    context: int,
    sink: int = 4,
    layer_types: list[str] | None = None,
    record: dict[str, Any] | None = None,
) -> Plan:
    """Return the span :class:`Plan` that picks, per global KV head, one of ``rules`` (or every
    token) minimising the summed ``costs [layer, kv_head, rule]`` within ``keep_fraction`` of the
    full cache's KV bytes at ``context`` tokens (the binary plans' budget; ring positions
    included, so the cache never holds more). ``record`` goes into the plan's ``rule["moa"]``."""
    keep_fraction = check_plan_settings(info, keep_fraction, None, context, sink, 1)
    n_layers, n_kv = info.n_layers, info.n_kv_heads
    types = list(layer_types or ["global"] * n_layers)
    per_token = 2 * info.head_dim * 4  # float32 keys + values per KV head
    window = info.sliding_window or 0
    per_sliding = min(context, window) if window else context
    total = n_kv * sum(per_sliding if t == "sliding" else context for t in types)
    fixed = n_kv * sum(per_sliding for t in types if t == "sliding")
    heads = [(lyr, k) for lyr in range(n_layers) for k in range(n_kv) if types[lyr] != "sliding"]
    options: list[tuple[float, float] | None] = [*rules, None]
    weights = np.array([[head_tokens(r, context, sink, per_token) for r in options] for _ in heads])
    cost = np.array([[*costs[lyr, k], 0.0] for lyr, k in heads])  # [head, rule + full]
    cost[weights == context] = 0.0  # a window as long as the context keeps every token
    capacity = math.floor(keep_fraction * total + 1e-9) - fixed
    chosen = solve(cost, weights, capacity) if capacity >= 0 else np.full(len(heads), -1)
    if (chosen < 0).any():
        least = (fixed + weights.min(1).sum()) / total
        raise HeadatlasError(
            f"{param('keep_fraction')} {keep_fraction:g} is below what the shortest rules keep ({least:.3f} at "
            f"{context} tokens): raise {param('keep_fraction')} or give smaller {param('alphas')}"
        )
    held = fixed + int(weights[np.arange(len(heads)), chosen].sum())
    if held > keep_fraction * total + 1e-9:  # the knapsack's promise, checked
        raise RuntimeError(f"MoA plan holds {held} tokens, over its budget {keep_fraction * total:.0f}")
    spans: list[list[list[float] | None]] = [[None] * n_kv for _ in range(n_layers)]
    for i, ((lyr, k), c) in enumerate(zip(heads, chosen, strict=True)):
        rule = options[c]
        spans[lyr][k] = None if rule is None or weights[i, c] == context else list(rule)
    full = [[k for k in range(n_kv) if spans[lyr][k] is None] for lyr in range(n_layers)]
    windows = [span_window(r[0], r[1], context) for row in spans for r in row if r is not None]
    n_full = sum(len(full[lyr]) for lyr in range(n_layers) if types[lyr] != "sliding")
    return Plan(
        model=info.to_dict(),
        full_heads=full,
        sink=sink,
        recent=max(windows, default=1),
        context=context,
        rule={"by": ["moa"], "keep_fraction": keep_fraction, "budget": None, "moa": record or {}},
        atlas={"path": None, "weights_sha256": info.sha256},
        layer_types=types,
        kv_bytes={
            "context": context,
            "full": total * per_token,
            "plan": held * per_token,
            "fraction": held / total,
            "dtype": "float32",
            "kv_heads_full": n_full,
            "kv_heads_streaming": len(heads) - n_full,
        },
        spans=spans,
    )


def profiled_plan(
    info: Any,
    profile: MoaProfile,
    keep_fraction: float,
    context: int,
    sensitivity: str = "grad",
    **options: Any,
) -> Plan:
    """Return :func:`moa_plan` for ``profile``'s ``sensitivity`` costs, the profile recorded in the
    plan (so :func:`replan` can solve it again at another budget or length)."""
    record = {
        "sensitivity": sensitivity,
        "rules": [list(r) for r in profile.rules],
        "profile_length": profile.length,
        "seconds": round(profile.seconds, 1),
        **profile.settings,
        "grad": np.round(profile.grad, 8).tolist(),
        "mass": np.round(profile.mass, 8).tolist(),
    }
    return moa_plan(
        info, profile.rules, profile.costs(sensitivity), keep_fraction=keep_fraction, context=context,
        sink=int(profile.settings["sink"]), record=record, **options,
    )  # fmt: skip


def replan(
    info: Any, plan: Plan, keep_fraction: float, context: int, sensitivity: str | None = None, **options: Any
) -> Plan:
    """Return ``plan``'s MoA profile solved again for ``keep_fraction`` at ``context`` tokens
    (``sensitivity``: the recorded one by default); a one-line error for a plan without a profile."""
    record = plan.rule.get("moa") or {}
    if "rules" not in record:
        raise HeadatlasError("the plan has no MoA profile: make one with `headatlas kv fit --method moa`")
    chosen = sensitivity or record["sensitivity"]
    if chosen not in SENSITIVITIES:
        raise HeadatlasError(f"{param('sensitivity')} must be grad or mass, got {chosen!r}")
    rules = [(float(a), float(b)) for a, b in record["rules"]]
    record = {**record, "sensitivity": chosen}
    return moa_plan(
        info, rules, np.asarray(record[chosen]), keep_fraction=keep_fraction, context=context,
        sink=plan.sink, record=record, **options,
    )  # fmt: skip
