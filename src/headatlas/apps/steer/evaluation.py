"""What steering does and costs, and steered generation (Li et al. 2023, ITI).

- :func:`evaluate`: on held-out facts (the truth task's test split), multiple-choice accuracy —
  the true completion's summed log-probability above the false one's; and the cost as ITI reports
  it: next-token cross-entropy and KL(unsteered ‖ steered) on UD English EWT test text. Each α of
  a sweep, for the probe heads and for the random-direction, random-head control.
- :func:`generate`: a greedy continuation, unsteered or steered.

Exporting a steering (a baked checkpoint, lm-evaluation-harness's file) is :mod:`.export`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ...batteries.base import ProbeSequence, make_batch, pad_id
from ...capture import padded_positions
from ...core.errors import HeadatlasError, check_at_least, check_number, param
from ...data.sequences import encode_text
from ...data.ud import ewt_sentences
from ...model.info import LoadedModel
from ..common.probe_tasks import false_answer, split_facts
from .steering import HeadShift, Steering, applied, shifted

Config = tuple[str, float]
"""``(kind, alpha)``: kind ``probe`` (the fitted heads) or ``random`` (the control)."""


def _forward(loaded: LoadedModel, seqs: list[ProbeSequence]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = make_batch(seqs, pad_id(loaded.tokenizer))
    device = loaded.device
    mask = batch.attention_mask.to(device)
    with torch.no_grad():
        out = loaded.model(
            input_ids=batch.input_ids.to(device), attention_mask=mask, **padded_positions(loaded.model, mask)
        )
    return out.logits.float().log_softmax(-1), batch.input_ids.to(device)  # [batch, seq, vocab], [batch, seq]


def completion(loaded: LoadedModel, prompt: str, answer: str) -> tuple[ProbeSequence, int]:
    """The prompt + answer sequence and the index of its first answer token."""
    prompt_ids, _ = encode_text(loaded.tokenizer, prompt)
    full, _ = encode_text(loaded.tokenizer, f"{prompt} {answer}")
    start = 0
    while start < min(len(prompt_ids), len(full) - 1) and prompt_ids[start] == full[start]:
        start += 1
    return ProbeSequence(tuple(full)), max(start, 1)


def mc_scores(loaded: LoadedModel, facts: Sequence[Any]) -> torch.Tensor:
    """Return per fact ``log p(true answer) − log p(false answer)`` given its prompt, ``[fact]``."""
    seqs, starts = [], []
    for fact in facts:
        for answer in (fact.answer, false_answer(fact)):
            seq, start = completion(loaded, fact.prompt, answer)
            seqs.append(seq)
            starts.append(start)
    logp, ids = _forward(loaded, seqs)
    width = ids.shape[1]
    totals = []
    for row, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        offset = width - len(seq.ids)
        positions = torch.arange(offset + start, width, device=ids.device)  # [answer_tokens]
        totals.append(logp[row, positions - 1, ids[row, positions]].sum())
    pairs = torch.stack(totals).view(-1, 2).cpu()  # [fact, 2]
    return pairs[:, 0] - pairs[:, 1]


def _text_cost(
    loaded: LoadedModel, seqs: list[ProbeSequence], base: torch.Tensor, mask: torch.Tensor
) -> tuple[float, float]:
    """Return (mean next-token CE, mean KL(base ‖ steered)) over real next-token positions."""
    logp, ids = _forward(loaded, seqs)
    real = mask[:, 1:].bool()  # [batch, seq - 1]
    ce = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # [batch, seq - 1]
    kl = (base.exp() * (base - logp)).sum(-1)[:, :-1]  # [batch, seq - 1]
    return float(ce[real].sum()), float(kl[real].sum())


def text_costs(
    loaded: LoadedModel, shifts: Mapping[Any, tuple[HeadShift, float]], n_text: int = 32, batch_size: int = 8
) -> tuple[dict[Any, tuple[float, float]], int]:
    """Return per key of ``shifts`` ``(CE, KL(unshifted ‖ shifted))`` in nats per token with the
    shift ``(HeadShift, alpha)`` at every position, on ``n_text`` EWT test sentences (64 tokens at
    most; ITI's cost measure), the key ``None`` holding the unshifted ``(CE, 0)``; and the token count."""
    texts = ewt_sentences("test", limit=n_text)
    seqs = [ProbeSequence(tuple(encode_text(loaded.tokenizer, t)[0][:64])) for t in texts]
    sums: dict[Any, list[float]] = {key: [0.0, 0.0] for key in [None, *shifts]}
    tokens = 0
    for start in range(0, len(seqs), batch_size):
        part = seqs[start : start + batch_size]
        base, ids = _forward(loaded, part)
        mask = make_batch(part, pad_id(loaded.tokenizer)).attention_mask.to(base.device)
        real = mask[:, 1:].bool()  # [batch, seq - 1]
        tokens += int(real.sum())
        sums[None][0] -= float(base[:, :-1].gather(-1, ids[:, 1:, None])[..., 0][real].sum())
        for key, (shift, alpha) in shifts.items():
            with shifted(loaded, shift, alpha):
                ce, kl = _text_cost(loaded, part, base, mask)
            sums[key][0] += ce
            sums[key][1] += kl
    return {key: (ce / max(tokens, 1), kl / max(tokens, 1)) for key, (ce, kl) in sums.items()}, tokens


def check_sweep(loaded: LoadedModel, alphas: Sequence[float] | float, n_text: int) -> list[float]:
    """Raise :class:`HeadatlasError` unless ``loaded`` is causal, ``alphas`` holds one or more
    finite strengths and ``n_text ≥ 1``; return the strengths as a list of floats."""
    if not loaded.info.causal:
        raise HeadatlasError(
            "steering evaluation scores answers and next-token loss: give a causal (decoder) model"
        )
    values = [alphas] if isinstance(alphas, int | float) else list(alphas)
    if not values:
        raise HeadatlasError(f"{param('alphas')} is empty: give at least one strength, e.g. 0,15")
    for value in values:
        check_number("alphas", value)
    check_at_least("n_text", n_text, 1)
    return [float(v) for v in values]


def evaluate(
    loaded: LoadedModel,
    steering: Steering,
    alphas: Sequence[float] = (0.0, 5.0, 10.0, 15.0, 20.0),
    n_text: int = 32,
    batch_size: int = 8,
    seed: int | None = None,
) -> pd.DataFrame:
    """Return the α sweep: one row per (kind, alpha) with ``mc_accuracy`` (truth steering only;
    NaN otherwise), ``mc_margin`` (mean log-prob margin), ``ce`` and ``kl`` (nats per token on
    ``n_text`` EWT test sentences) and ``n_facts``, ``n_tokens`` — Li et al. 2023's table."""
    alphas = check_sweep(loaded, alphas, n_text)
    check_at_least("batch_size", batch_size, 1)
    configs: list[Config] = [(kind, float(a)) for kind in ("probe", "random") for a in alphas]
    facts = split_facts(int(steering.params.get("seed", 0) if seed is None else seed))["test"]
    mc: dict[Config, torch.Tensor] = {}
    if steering.task == "truth":
        for kind, alpha in configs:
            with applied(loaded, steering, alpha, control=kind == "random"):
                mc[(kind, alpha)] = mc_scores(loaded, facts)
    costs, tokens = text_costs(
        loaded,
        {
            (kind, alpha): (steering.control if kind == "random" else steering.shift, alpha)
            for kind, alpha in configs
        },
        n_text,
        batch_size,
    )
    rows = []
    for config in configs:
        margin = mc.get(config)
        rows.append(
            {
                "kind": config[0],
                "alpha": config[1],
                "mc_accuracy": float((margin > 0).float().mean()) if margin is not None else float("nan"),
                "mc_margin": float(margin.mean()) if margin is not None else float("nan"),
                "ce": costs[config][0],
                "kl": costs[config][1],
                "n_facts": len(facts) if margin is not None else 0,
                "n_tokens": tokens,
            }
        )
    return pd.DataFrame(rows)


def sweep_figure(table: pd.DataFrame, title: str, out: str | Path) -> Path:
    """Write the α sweep: MC accuracy and KL against α, probe heads vs random directions."""
    from matplotlib.figure import Figure

    from ...report.figures import save_figure

    fig = Figure(figsize=(8.0, 3.2))
    for index, (metric, label) in enumerate(
        (("mc_accuracy", "MC accuracy (held-out facts)"), ("kl", "KL to unsteered (nats/token)"))
    ):
        ax = fig.add_subplot(1, 2, index + 1)
        for kind, style in (("probe", "-o"), ("random", "--s")):
            part = table[table["kind"] == kind].sort_values("alpha")
            ax.plot(
                part["alpha"],
                part[metric],
                style,
                label="top-k probe heads" if kind == "probe" else "random heads, random directions",
            )
        ax.set_xlabel("α", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        ax.tick_params(labelsize=7)
        if index == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out)


def generate(
    loaded: LoadedModel,
    steering: Steering | None,
    prompt: str,
    alpha: float | None = None,
    max_new_tokens: int = 40,
) -> str:
    """Return the greedy continuation of ``prompt`` with ``steering`` applied at ``alpha`` (none: unsteered).

    ``max_new_tokens`` is at least 1 and, with the prompt, within the model's context."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise HeadatlasError(f"{param('prompt')} is empty: give the text to continue")
    if alpha is not None:
        check_number("alpha", alpha)
    check_at_least("max_new_tokens", max_new_tokens, 1)
    ids, _ = encode_text(loaded.tokenizer, prompt)
    longest = loaded.info.context_length
    if longest is not None and len(ids) + max_new_tokens > longest:
        raise HeadatlasError(
            f"{param('max_new_tokens')} {max_new_tokens:,} and the prompt's {len(ids)} tokens go beyond "
            f"{loaded.info.name}'s context of {longest:,} tokens"
        )
    inputs = torch.tensor([ids], device=loaded.device)  # [1, seq]
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad_id(loaded.tokenizer)}
    model: Any = loaded.model
    with torch.no_grad():
        if steering is None:
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs)
        else:
            with applied(loaded, steering, alpha):
                out = model.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs)
    return str(loaded.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


def summary_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Return the sweep as JSON-ready rows (floats rounded to 4 places)."""
    return [
        {str(k): (round(float(v), 4) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()}
        for row in table.to_dict("records")
    ]
