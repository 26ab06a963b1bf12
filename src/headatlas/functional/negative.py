"""Battery ``negative`` → negative-bias heads: heads that attend to the "No" of a yes/no instruction,
whatever the question.

Yu et al. 2024 ("Correcting Negative Bias in Large Language Models through Negative Attention Score
Alignment") find that language models answer binary questions "No" more often than the evidence
warrants (recall of "Yes" well below its precision), and trace it to heads that attend to the
negative answer candidate offered in the instruction regardless of the question. Their negative
attention score, per head and prompt, as we implement it:

    NAS(h) = Σ_{i ≥ t} (A_h[i, yes] + A_h[i, no]) · log(A_h[i, no] / A_h[i, yes])

where ``yes`` and ``no`` are the positions of the candidate tokens in the instruction, and the
query rows ``i`` run from the first token after the instruction (``t``) to the last prompt token,
whose next token is the answer. A head that looks at the candidates and prefers "No" scores high;
one that ignores them scores ≈ 0 (the weight ``A[yes] + A[no]`` is small); one that prefers "Yes"
scores negative. Attention is clamped at 1e-6 inside the log. ``negative_attention`` is NAS
averaged over prompts.

Questions (:func:`yes_no_questions`) are built from the headatlas word lists with a balanced gold
label: for every pair one true question ("Is Paris the capital of France?") and one false one (the
tail of another pair, seeded). The model's answer is "Yes" when the logit of "Yes" beats "No" at
the answer position (each the log-sum-exp over its single-token spellings). ``yes_no_report`` gives
accuracy, the "No" rate and the precision and recall of each answer; the negative bias is recall of
"Yes" below its precision. The battery's task metric is the "No" rate (0.5 = no bias on this
balanced set), which ablating or scaling the top heads should move.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..atlas.stats import HeadStats
from ..batteries.base import ProbeSequence, make_batch, pad_id
from ..capture import capture, head_outputs
from ..capture.views import AttentionView
from ..core.errors import HeadatlasError
from ..core.heads import Head, check_heads, heads_by_layer
from ..core.progress import Progress, no_progress
from ..data.sequences import chat_frame, sequence_frame
from ..data.words import ANTONYMS, CHEMICAL_SYMBOLS, COUNTRY_CAPITALS, load_word_pairs
from ..model.info import LoadedModel
from .base import BatterySpec, FunctionalConfig, FunctionalResult

INSTRUCTION = "Answer the question with Yes or No."
"""The instruction, holding the two answer candidates (Yu et al. put them in the instruction)."""
YES, NO = "Yes", "No"
EPS = 1e-6
"""Attention floor inside NAS's log."""


def _pairs() -> dict[str, list[tuple[str, str, str]]]:
    """(relation → [(question template, head, tail)]) from the word lists."""
    words = load_word_pairs()
    fr = words.pair("fr") if "fr" in words.languages else []
    return {
        "capital": [("Is {tail} the capital of {head}?", c, k) for c, k in COUNTRY_CAPITALS],
        "antonym": [("Is {tail} the opposite of {head}?", a, b) for a, b in ANTONYMS],
        "symbol": [("Is {tail} the chemical symbol of {head}?", e, s) for e, s in CHEMICAL_SYMBOLS],
        "translation": [('Is "{tail}" the French word for "{head}"?', e, f) for e, f in fr],
    }


@dataclass(frozen=True)
class Question:
    """A yes/no question and its gold answer (``True`` = yes)."""

    text: str
    gold: bool
    relation: str


def yes_no_questions(seed: int = 0, limit: int | None = None) -> list[Question]:
    """Return balanced yes/no questions (one true and one false per word pair, shuffled, seeded).

    A false question takes the tail of another pair of the same relation (never one equal to the
    true tail). ``limit`` keeps the first ``limit`` pairs' questions of the shuffled order, still
    balanced.
    """
    rng = np.random.default_rng(seed)
    pairs: list[tuple[Question, Question]] = []
    for relation, items in _pairs().items():
        tails = [t for _, _, t in items]
        for template, head, tail in items:
            wrong = [t for t in tails if t.lower() != tail.lower()]
            other = wrong[int(rng.integers(len(wrong)))]
            pairs.append(
                (
                    Question(template.format(head=head, tail=tail), True, relation),
                    Question(template.format(head=head, tail=other), False, relation),
                )
            )
    order = rng.permutation(len(pairs))
    chosen = [pairs[int(i)] for i in order][: (limit + 1) // 2 if limit else None]
    return [q for pair in chosen for q in pair]


@dataclass(frozen=True)
class Prompt:
    """A question as the model reads it: ``ids``, the candidate positions and the first scored row."""

    ids: tuple[int, ...]
    yes: int
    no: int
    start: int
    question: Question


def _candidate_ids(tokenizer: Any, word: str) -> list[int]:
    ids = {int(tokenizer(w, add_special_tokens=False)["input_ids"][0]) for w in (word, " " + word)}
    return sorted(ids)


def encode_question(tokenizer: Any, question: Question) -> Prompt:
    """Frame ``INSTRUCTION + " " + question`` as a chat turn (or as plain text ending in "Answer:")."""
    content = f"{INSTRUCTION} {question.text}"
    chat = chat_frame(tokenizer)
    if chat is not None:
        before = tokenizer(chat.before, add_special_tokens=False)["input_ids"]
        after = tokenizer(chat.after, add_special_tokens=False)["input_ids"]
    else:
        frame = sequence_frame(tokenizer)
        before, after = list(frame.prefix), tokenizer("\nAnswer:", add_special_tokens=False)["input_ids"]
    enc = tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]

    def token_at(char: int) -> int:
        hit = next((k for k, (a, b) in enumerate(spans) if a <= char < b), None)
        if hit is None:
            raise HeadatlasError(f"cannot find the answer candidate at character {char} of {content!r}")
        return len(before) + hit

    yes = token_at(INSTRUCTION.index(YES))
    no = token_at(INSTRUCTION.index(NO))
    start = len(before) + next(k for k, (a, _) in enumerate(spans) if a >= len(INSTRUCTION))
    ids = [*before, *(int(i) for i in enc["input_ids"]), *after]
    return Prompt(tuple(int(i) for i in ids), yes, no, start, question)


def nas_rows(a_yes: torch.Tensor, a_no: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Return NAS per prompt and head, ``[batch, head]`` (Yu et al. 2024).

    Args:
        a_yes: attention on the "Yes" candidate, ``[batch, head, query]``.
        a_no: attention on the "No" candidate, ``[batch, head, query]``.
        rows: the query rows that count (after the instruction), ``[batch, query]``.
    """
    y, n = a_yes.clamp_min(EPS), a_no.clamp_min(EPS)
    terms = (a_yes + a_no) * torch.log(n / y)  # [batch, head, query]
    return (terms * rows[:, None].to(terms.dtype)).sum(-1)  # [batch, head]


def _prompts(loaded: LoadedModel, config: FunctionalConfig) -> list[Prompt]:
    questions = yes_no_questions(config.seed, config.n_prompts)
    return [encode_question(loaded.tokenizer, q) for q in questions]


def _answer_margin(loaded: LoadedModel, last: torch.Tensor) -> torch.Tensor:
    """``logsumexp(logits[Yes spellings]) − logsumexp(logits[No spellings])`` from the last position's
    logits ``[batch, vocab]``, ``[batch]``."""
    last = last.float()
    yes = last[:, _candidate_ids(loaded.tokenizer, YES)].logsumexp(-1)
    no = last[:, _candidate_ids(loaded.tokenizer, NO)].logsumexp(-1)
    return yes - no  # [batch]


def answer_margins(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> tuple[list[Question], np.ndarray]:
    """Return the questions and the model's Yes − No margin on each (positive = answers "Yes")."""
    prompts = _prompts(loaded, config)
    pad = pad_id(loaded.tokenizer)
    margins = []
    chunks = [prompts[i : i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    with torch.no_grad():
        for index, chunk in enumerate(chunks):
            batch = make_batch([ProbeSequence(p.ids) for p in chunk], pad)
            logits = loaded.model(
                input_ids=batch.input_ids.to(loaded.device),
                attention_mask=batch.attention_mask.to(loaded.device),
                logits_to_keep=1,
            ).logits  # [batch, 1, vocab]
            margins.append(_answer_margin(loaded, logits[:, -1]).cpu())
            progress(index + 1, len(chunks))
    return [p.question for p in prompts], torch.cat(margins).numpy()


def yes_no_report(gold: Sequence[bool], margins: np.ndarray) -> dict[str, float]:
    """Return accuracy, the "No" rate, and precision / recall of the "Yes" and "No" answers.

    ``yes_gap`` = precision − recall of "Yes": positive when the model says "No" to true
    statements more than it says "Yes" to false ones (Yu et al. 2024's negative bias).
    """
    g = np.asarray(gold, dtype=bool)
    p = np.asarray(margins) > 0

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else float("nan")

    tp, fp, fn, tn = int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum()), int((~p & ~g).sum())
    report = {
        "n": float(len(g)),
        "accuracy": ratio(tp + tn, len(g)),
        "no_rate": ratio(fn + tn, len(g)),
        "yes_precision": ratio(tp, tp + fp),
        "yes_recall": ratio(tp, tp + fn),
        "no_precision": ratio(tn, tn + fn),
        "no_recall": ratio(tn, tn + fp),
    }
    report["yes_gap"] = report["yes_precision"] - report["yes_recall"]
    return report


def run_negative(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> FunctionalResult:
    """Score every head's negative attention score on balanced yes/no questions (Yu et al. 2024);
    return a :class:`FunctionalResult` (``negative_attention``; the model's answers in ``params``)."""
    info = loaded.info
    prompts = _prompts(loaded, config)
    stats = HeadStats(info.n_layers, info.n_heads)
    pad = pad_id(loaded.tokenizer)
    margins = []
    chunks = [prompts[i : i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    partial: dict[int, list[torch.Tensor]] = {}
    head = loaded.model.get_output_embeddings()
    if head is None or not info.causal:
        raise HeadatlasError(
            f"{info.name} has no causal LM head: the negative battery reads its yes/no answers"
        )

    def on_view(view: AttentionView) -> None:
        ctx = session.context
        a_yes = view.at_keys(ctx["yes"])  # [batch, head, query]
        a_no = view.at_keys(ctx["no"])  # [batch, head, query]
        rows = view.q_index[None, :] >= ctx["start"][:, None]  # [batch, query]
        partial.setdefault(view.layer, []).append(nas_rows(a_yes, a_no, rows))

    with capture(loaded, on_view) as session:
        for index, chunk in enumerate(chunks):
            batch = make_batch([ProbeSequence(p.ids) for p in chunk], pad)
            shift = batch.input_ids.shape[1] - torch.tensor([len(p.ids) for p in chunk])  # [batch]
            ctx = {
                name: (shift + torch.tensor([getattr(p, name) for p in chunk])).to(loaded.device)
                for name in ("yes", "no", "start")
            }
            hidden = session.run(batch.input_ids, batch.attention_mask, with_head=False, context=ctx)
            with torch.no_grad():
                last = head(hidden[:, -1])  # [batch, vocab]: the LM head on the last position only
            margins.append(_answer_margin(loaded, last).cpu())
            for layer, parts in partial.items():
                values = torch.stack(parts).sum(0)[..., None]  # [batch, head, 1]
                stats.add(
                    "negative_attention", layer, values, torch.ones(values.shape[0], 1, dtype=torch.bool)
                )
            partial.clear()
            progress(index + 1, len(chunks))
    report = yes_no_report([p.question.gold for p in prompts], torch.cat(margins).numpy())
    params = {
        "instruction": INSTRUCTION,
        "n_questions": len(prompts),
        "relations": sorted({p.question.relation for p in prompts}),
        "seed": config.seed,
        "format": "chat template"
        if chat_frame(loaded.tokenizer) is not None
        else "plain, ending in 'Answer:'",
        "answers": report,
    }
    return FunctionalResult("negative", stats, params)


def no_rate(loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress) -> float:
    """Return the share of "No" answers on the balanced questions (0.5 = unbiased) — the negative bias
    that the top NAS heads should carry (Yu et al. 2024)."""
    questions, margins = answer_margins(loaded, config, progress)
    return yes_no_report([q.gold for q in questions], margins)["no_rate"]


@contextmanager
def scaled_heads(loaded: LoadedModel, heads: Sequence[Head | str], factor: float) -> Iterator[None]:
    """Within the block, multiply the outputs of ``heads`` by ``factor`` (0 = zero ablation), on the one
    head-output hook; weights are not touched."""
    info = loaded.info
    by_layer = heads_by_layer(check_heads(heads, info.n_layers, info.n_heads))

    def scale(layer: int, z: torch.Tensor, _context: object) -> torch.Tensor:
        out = z.clone()  # [batch, query, head, d_head]
        out[..., by_layer[layer], :] *= factor
        return out

    if not by_layer:
        yield
        return
    with head_outputs(loaded, scale, layers=by_layer):
        yield


SPEC = BatterySpec(
    name="negative",
    run=run_negative,
    metric=no_rate,
    metric_name='share of "No" answers on balanced yes/no questions (0.5 = no bias)',
    higher_is_better=False,
)
