"""``kv fit``: DuoAttention's gate optimisation, sized for a CPU.

Xiao et al. 2024 (DuoAttention) give every KV head a gate α ∈ [0, 1] that mixes its full
attention with streaming attention (``sink`` first + ``recent`` last keys), freeze the model, and
train only the gates to keep the final hidden states of passkey prompts unchanged while pushing
the gates down: ``loss = MSE(h_gated, h_full) + λ · mean |α|``, gates clamped to [0, 1] after each
step. Heads whose gate stays high are retrieval heads and keep their full cache. As in
DuoAttention's training script, each prompt is followed by its answer (teacher-forced) and the MSE is
taken only at the positions that predict the answer's tokens (``loss_on="answer"``; ``"all"`` takes
every position, which the local context dominates). Here the prompts are the ``niah`` and
``multikey`` tasks' (:mod:`.tasks`, a seed stream of their own so that they never equal the prompts
``kv eval`` and ``bench_kv.py`` draw), the mix is the ``headatlas_gate`` backend
(:mod:`headatlas.apps.kv.backends.gate`), and the gates become a ``duo_gate`` score from which
:func:`.plan.plan` keeps the top heads within a byte budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...atlas.table import Atlas
from ...core.errors import HeadatlasError, check_at_least, check_number, param
from ...model.compat import attention_implementation
from ...model.info import LoadedModel
from .backends import gate as backend_gate
from .evaluate import encode
from .plan import Plan, plan
from .tasks import Sample, check_tasks, make_samples

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Trained gates ``alpha [layer, kv_head]``, the loss per step, and the wall time."""

    alpha: np.ndarray
    losses: list[float]
    seconds: float
    settings: dict[str, float | int | str]


def check_fit_settings(
    steps: int,
    seq_len: int,
    n_prompts: int,
    sink: int,
    recent: int,
    lam: float,
    tasks: Sequence[str],
    loss_on: str,
) -> None:
    """Raise :class:`HeadatlasError` naming the first of :func:`fit_gates`' settings that cannot
    work, before any work."""
    check_at_least("steps", steps, 1)
    check_at_least("n_prompts", n_prompts, 1)
    check_at_least("seq_len", seq_len, 8)
    check_at_least("sink", sink, 0)
    check_at_least("recent", recent, 1)
    check_number("lam", lam)
    if lam < 0:
        raise HeadatlasError(f"{param('lam')} must be at least 0 (the gates' L1 weight), got {lam}")
    if recent >= seq_len:
        raise HeadatlasError(
            f"{param('recent')} {recent} must be below {param('seq_len')} {seq_len}: nothing would stream"
        )
    if loss_on not in ("answer", "all"):
        raise HeadatlasError(f"{param('loss_on')} must be answer or all, got {loss_on!r}")
    check_tasks(tasks)


def fit_gates(
    loaded: LoadedModel,
    *,
    steps: int = 48,
    seq_len: int = 512,
    n_prompts: int = 16,
    sink: int = 4,
    recent: int = 64,
    lam: float = 0.05,
    lr: float = 0.05,
    seed: int = 0,
    tasks: Sequence[str] = ("niah", "multikey"),
    loss_on: str = "answer",
    on_step: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Return DuoAttention gates trained on ``n_prompts`` prompts of about ``seq_len`` tokens drawn
    in turn from ``tasks``, one prompt per step in turn, the loss on the answer's positions or on
    ``"all"`` (module docstring; Xiao et al. 2024). The model is not changed."""
    loaded.info.require_one_stack("kv fit")
    check_fit_settings(steps, seq_len, n_prompts, sink, recent, lam, tasks, loss_on)
    model, info = loaded.model, loaded.info
    prompts, answers = _teacher_forced(loaded.tokenizer, list(tasks), seq_len, n_prompts, seed)
    where = [loss_positions(p, a, loss_on) for p, a in answers]
    body = model.base_model
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        targets = [
            body(input_ids=ids.to(loaded.device)).last_hidden_state[:, w]
            for ids, w in zip(prompts, where, strict=True)
        ]
    alpha = torch.ones(info.n_layers, info.n_kv_heads, requires_grad=True, device=loaded.device)
    optimiser = torch.optim.Adam([alpha], lr=lr)
    backend_gate.register()
    token = backend_gate.ACTIVE_GATES.set(backend_gate.GateState(alpha, sink, recent))
    losses: list[float] = []
    started = time.perf_counter()
    try:
        with attention_implementation(model, backend_gate.NAME):
            for step in range(steps):
                i = step % len(prompts)
                hidden = body(input_ids=prompts[i].to(loaded.device)).last_hidden_state[:, where[i]]
                distill = torch.nn.functional.mse_loss(hidden, targets[i]) / targets[i].pow(2).mean()
                loss = distill + lam * alpha.abs().mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    alpha.clamp_(0.0, 1.0)
                losses.append(loss.item())
                if on_step is not None:
                    on_step(step + 1, losses[-1])
    finally:
        backend_gate.ACTIVE_GATES.reset(token)
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    settings: dict[str, float | int | str] = {
        "steps": steps, "seq_len": seq_len, "n_prompts": n_prompts, "sink": sink, "recent": recent,
        "lambda": lam, "lr": lr, "seed": seed, "tasks": ",".join(tasks), "loss_on": loss_on,
    }  # fmt: skip
    return FitResult(alpha.detach().cpu().numpy(), losses, time.perf_counter() - started, settings)


def fit_samples(tokenizer: Any, tasks: list[str], seq_len: int, n_prompts: int, seed: int) -> list[Sample]:
    """Return the ``n_prompts`` fit prompts, taken in turn from ``tasks``; their seed stream
    (``"fit<seed>"``) is not one ``kv eval`` or ``bench_kv.py`` draws (integer seeds)."""
    per_task = {
        t: make_samples(tokenizer, t, seq_len, -(-n_prompts // len(tasks)), f"fit{seed}") for t in tasks
    }
    return [per_task[tasks[k % len(tasks)]][k // len(tasks)] for k in range(n_prompts)]


def loss_positions(prompt: int, answer: int, loss_on: str) -> slice:
    """Return the positions the fit's MSE is taken at: for ``"answer"`` the hidden states that
    predict the answer's ``answer`` tokens (from the prompt's last position on), for ``"all"`` every one."""
    return slice(prompt - 1, prompt - 1 + answer) if loss_on == "answer" else slice(None)


def _teacher_forced(
    tokenizer: Any, tasks: list[str], seq_len: int, n_prompts: int, seed: int
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Return each fit prompt followed by its expected answer, ``[1, seq]`` ids, and its
    ``(prompt tokens, answer tokens)``."""
    ids, sizes = [], []
    for sample in fit_samples(tokenizer, tasks, seq_len, n_prompts, seed):
        prompt = encode(tokenizer, sample)  # [1, prompt]
        answer = tokenizer(" " + ", ".join(sample.expected), add_special_tokens=False)["input_ids"]
        ids.append(torch.cat([prompt, torch.tensor([answer])], dim=1))  # [1, prompt + answer]
        sizes.append((prompt.shape[1], len(answer)))
    return ids, sizes


def gate_atlas(loaded: LoadedModel, alpha: np.ndarray) -> Atlas:
    """An atlas of the model whose ``duo_gate`` column is each query head's KV-head gate."""
    atlas = Atlas.minimal(loaded.info)
    table = atlas.table
    table["duo_gate"] = alpha[table["layer"].to_numpy(), table["kv_head"].to_numpy()]
    return atlas


def fitted_plan(
    loaded: LoadedModel, result: FitResult, keep_fraction: float, context: int, **options: object
) -> Plan:
    """Return the :class:`Plan` keeping the highest-gated KV heads within ``keep_fraction`` of the
    KV bytes at ``context`` tokens, with the fit's settings recorded in its rule."""
    found = plan(
        gate_atlas(loaded, result.alpha),
        keep_fraction=keep_fraction,
        by="duo_gate",
        sink=int(result.settings["sink"]),
        recent=int(result.settings["recent"]),
        context=context,
        **options,  # type: ignore[arg-type]
    )
    found.rule = {**found.rule, "fit": {**result.settings, "seconds": round(result.seconds, 1),
                                        "final_loss": round(result.losses[-1], 6)}}  # fmt: skip
    return found
