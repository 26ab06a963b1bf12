"""What steering does and costs, steered generation, and export (Li et al. 2023, ITI).

- :func:`evaluate`: on held-out facts (the truth task's test split), multiple-choice accuracy —
  the true completion's summed log-probability above the false one's; and the cost as ITI reports
  it: next-token cross-entropy and KL(unsteered ‖ steered) on UD English EWT test text. Each α of
  a sweep, for the probe heads and for the random-direction, random-head control.
- :func:`export_bake`: a checkpoint with the shift folded into the output projection's bias.
  The projection computes ``W_O (z + δ) + b = W_O z + (b + W_O δ)``, so the bias gains ``W_O δ``
  — not ``δ`` itself (the bug of the reference code's baked models). Plain ``transformers`` loads it.
- :func:`export_lm_eval`: the ``.pt`` lm-evaluation-harness's ``steered`` model reads: per hook
  point (the output projection's module name) a vector added to the module's output, ``W_O δ``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from ...batteries.base import ProbeSequence, make_batch, pad_id
from ...capture import output_projections, output_weight, padded_positions
from ...core.errors import HeadatlasError, check_at_least, check_choice, check_number, param
from ...core.heads import head_name
from ...core.outputs import Folder, check_output_file, check_output_folder, output_folder
from ...core.storage import atomic_path, write_json
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


def output_shifts(loaded: LoadedModel, steering: Steering, alpha: float) -> dict[int, torch.Tensor]:
    """Return ``{layer: W_O δ [d_model]}``: each steered layer's shift mapped through its output projection."""
    projections = output_projections(loaded)
    shifts = steering.shift.by_layer(alpha, loaded.info.n_heads)
    out = {}
    for layer, delta in shifts.items():
        weight = output_weight(projections[layer]).float()  # [d_model, head * d_head]
        out[layer] = weight @ delta.reshape(-1).to(weight.device)  # [d_model]
    return out


EXPORT_FORMATS = ("bake", "lm-eval")
BAKE_FOLDER = Folder("steer export --format bake", "headatlas-steer-bake.json")
"""A baked checkpoint: the marker records which steering and α it holds."""
LM_EVAL_FOLDER = Folder("steer export --format lm-eval", "steer.pt")
"""Where lm-evaluation-harness's steering file goes when ``out`` is a directory."""


def check_export_target(fmt: str, out: str | Path, force: bool = False, model: str | None = None) -> None:
    """Raise :class:`HeadatlasError` unless ``steer export --format fmt`` may write ``out``, before
    any work: a baked checkpoint's folder, or for ``lm-eval`` a ``.pt`` file or a folder for
    ``steer.pt`` (:mod:`headatlas.core.outputs`)."""
    check_choice("format", fmt, EXPORT_FORMATS)
    if fmt == "lm-eval" and Path(out).suffix == ".pt":
        check_output_file(out, (".pt",), force=force)
        return
    check_output_folder(out, BAKE_FOLDER if fmt == "bake" else LM_EVAL_FOLDER, force, model=model)


def export_bake(loaded: LoadedModel, steering: Steering, alpha: float, out: str | Path) -> Path:
    """Write a checkpoint of ``loaded`` with the shift at ``alpha`` folded into the output
    projections' biases (``b + W_O δ``) and return its directory. Models whose projection has no
    bias get one through ``config.attention_bias`` (the other new biases are zero); a family
    without that switch is refused."""
    target = Path(out)
    model = loaded.model
    shifts = output_shifts(loaded, steering, alpha)
    projections = output_projections(loaded)
    if any(projections[layer].bias is None for layer in shifts):
        if not hasattr(model.config, "attention_bias"):
            raise HeadatlasError(
                f"a {loaded.info.arch} output projection has no bias and its config no attention_bias: "
                "use the hook (steer generate) or --format lm-eval"
            )
        config = copy.deepcopy(model.config)
        config.attention_bias = True
        baked: Any = type(model)(config)
        baked = baked.to(dtype=next(model.parameters()).dtype)
        missing = baked.load_state_dict(model.state_dict(), strict=False).missing_keys
        with torch.no_grad():
            for name in missing:
                if not name.endswith(".bias"):
                    raise HeadatlasError(
                        f"cannot bake into {loaded.info.arch}: weight {name} has no counterpart"
                    )
                baked.get_parameter(name).zero_()
    else:
        baked = copy.deepcopy(model)
    baked_loaded = LoadedModel(baked, loaded.tokenizer, loaded.info)
    with torch.no_grad():
        for layer, shift in shifts.items():
            bias = cast(torch.Tensor, output_projections(baked_loaded)[layer].bias)
            bias += shift.to(bias)
    with output_folder(target, BAKE_FOLDER) as tmp:
        baked.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        heads = [head_name(*h) for h in steering.shift.heads]
        write_json(tmp / BAKE_FOLDER.marker, {"task": steering.task, "alpha": alpha, "heads": heads})
    return target


def export_lm_eval(loaded: LoadedModel, steering: Steering, alpha: float, out: str | Path) -> Path:
    """Write ``steer.pt`` for lm-evaluation-harness ``--model steered``: ``{hook point: {
    "steering_vector" [1, d_model] = W_O δ, "steering_coefficient": 1.0, "action": "add"}}``
    (hook points are the output projections' module names); return the file."""

    names = {id(module): name for name, module in loaded.model.named_modules()}
    projections = output_projections(loaded)
    config = {
        names[id(projections[layer])]: {
            "steering_vector": shift[None].cpu().contiguous(),
            "steering_coefficient": 1.0,
            "action": "add",
        }
        for layer, shift in output_shifts(loaded, steering, alpha).items()
    }
    target = Path(out)
    target = target / LM_EVAL_FOLDER.marker if target.suffix != ".pt" else target
    with atomic_path(target, suffix=".pt") as tmp:
        torch.save(config, tmp)
    return target


def summary_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Return the sweep as JSON-ready rows (floats rounded to 4 places)."""
    return [
        {str(k): (round(float(v), 4) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()}
        for row in table.to_dict("records")
    ]
