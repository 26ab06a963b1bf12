"""Multiple-choice scores from answer log-probabilities, as the TruthfulQA paper computes them
(Lin et al. 2022), with a head shift on the answer tokens as ITI's evaluation applies it (Li et al. 2023).

An answer's score is the summed log-probability of its tokens after the question's prompt
(:func:`headatlas.apps.common.truthfulqa.qa_prompt`). MC1: the best answer's score beats every
false answer's. MC2: the probability mass of the true answers, ``Σ_true exp(s) / Σ_all exp(s)``.

Every answer of a question shares the prompt, and every prompt shares the primer, so
:func:`choice_logprobs` runs the primer once (a KV cache, copied per row with ``reorder_cache``),
then packs each question into one row: its own prompt tokens followed by all its answers, with
a 4D attention mask that lets each answer see the primer, the prompt and itself only (positions
restart after the prompt for every answer). Each prompt token and each answer token is computed
once. A shift is applied to the answer tokens only, never to the prompt, as in Li et al.'s MC
evaluation, which edits the heads from the answer's start. ``share_prefix=False`` runs every
prompt + answer in full instead (the shift masked to the same tokens); both agree to float
rounding (tested).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...batteries.base import make_batch, pad_id
from ...capture import head_outputs, padded_positions
from ...core.progress import Progress, no_progress
from ...model.compat import cache_kwargs, output_cache
from ...model.info import LoadedModel
from ..common.truthfulqa import TruthfulQuestion, qa_prompt
from .evaluation import completion
from .steering import HeadShift, shifted


@dataclass(frozen=True)
class ChoiceQuestion:
    """A question as token ids: ``prefix`` (shared by its answers), per answer the ``rests`` after
    it and ``first``, the index in the rest of the first scored token; ``n_true`` true answers come
    first, the best at ``best``."""

    prefix: tuple[int, ...]
    rests: tuple[tuple[int, ...], ...]
    first: tuple[int, ...]
    n_true: int
    best: int


def _common(seqs: Sequence[Sequence[int]]) -> int:
    """Return the length of the longest prefix all ``seqs`` share."""
    shortest = min(len(s) for s in seqs)
    n = 0
    while n < shortest and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def encode_choices(loaded: LoadedModel, questions: Sequence[TruthfulQuestion]) -> list[ChoiceQuestion]:
    """Return each question's prompt and answers as token ids (each prompt + answer tokenized whole)."""
    out = []
    for question in questions:
        prompt = qa_prompt(question.question)
        pairs = [completion(loaded, prompt, answer) for answer in question.answers]
        fulls = [seq.ids for seq, _ in pairs]
        shared = min(_common(fulls), *(start for _, start in pairs))
        out.append(
            ChoiceQuestion(
                tuple(fulls[0][:shared]),
                tuple(tuple(f[shared:]) for f in fulls),
                tuple(start - shared for _, start in pairs),
                question.n_true,
                question.best,
            )
        )
    return out


def mc_metrics(scores: torch.Tensor, n_true: int, best: int) -> tuple[float, float]:
    """Return TruthfulQA's (MC1, MC2) of one question from its answer scores ``[answer]`` (true
    answers first, ``n_true`` of them, the best at ``best``): MC1 = 1 when the best answer's score
    is above every false one's, MC2 = the true answers' share of ``Σ exp(score)``."""
    mc1 = float(scores[best] > scores[n_true:].max())
    mc2 = float(torch.softmax(scores.double(), 0)[:n_true].sum())
    return mc1, mc2


class _Features:
    """Every head's output at each answer's last token, gathered while the answers run."""

    def __init__(self, loaded: LoadedModel, n_answers: int) -> None:
        info = loaded.info
        self.out = torch.zeros(
            info.n_layers, n_answers, info.n_heads, info.head_dim
        )  # [layer, answer, head, d]

    def keep(self, layer: int, z: torch.Tensor, where: Any) -> None:
        if where is not None:
            rows, cols, ids = where
            self.out[layer, ids] = z[rows, cols].float().cpu()  # [rows, head, d_head]

    def stacked(self) -> torch.Tensor:
        layers, n, heads, d = self.out.shape
        return self.out.permute(0, 2, 1, 3).reshape(layers * heads, n, d)  # [group, answer, d_head]


@contextlib.contextmanager
def _answer_hooks(
    loaded: LoadedModel, shift: HeadShift | None, alpha: float, features: _Features | None
) -> Iterator[Any]:
    """The hooks of a scoring pass: the shift (its tap's context: where) and the feature reader."""
    with contextlib.ExitStack() as stack:
        shift_tap = stack.enter_context(shifted(loaded, shift, alpha)) if shift is not None else None
        read_tap = stack.enter_context(head_outputs(loaded, features.keep)) if features is not None else None
        yield shift_tap, read_tap


def _run(
    loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
) -> Any:
    kwargs = cache_kwargs(loaded.model, cache) if cache is not None else {}
    return loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)


def _expanded(cache: Any, index: torch.Tensor) -> Any:
    """A copy of ``cache`` whose rows are ``cache``'s rows ``index`` (``None`` stays ``None``)."""
    if cache is None:
        return None
    rows = copy.deepcopy(cache)
    rows.reorder_cache(index)
    return rows


def _primer(loaded: LoadedModel, questions: Sequence[ChoiceQuestion]) -> tuple[int, Any]:
    """Run the tokens every prompt shares (leaving each question at least one of its own) once;
    return their number and their KV cache (``None`` when there are none)."""
    shared = min(_common([q.prefix for q in questions]), min(len(q.prefix) for q in questions) - 1)
    if shared < 1:
        return 0, None
    ids = torch.tensor([questions[0].prefix[:shared]], device=loaded.device)  # [1, shared]
    positions = torch.arange(shared, device=loaded.device)[None]  # [1, shared]
    return shared, output_cache(_run(loaded, ids, torch.ones_like(ids), positions, None))


def _pack(chunk: Sequence[ChoiceQuestion], shared: int, pad: int) -> tuple[torch.Tensor, ...]:
    """Pack each question's own prompt tokens and all its answers into one row (right-padded).

    Returns ``ids``, ``positions`` and ``segment`` ``[row, width]`` (0: the question's prompt,
    ``i + 1``: answer ``i``, −1: padding); positions restart after the prompt for every answer."""
    rows = [[*q.prefix[shared:], *(t for rest in q.rests for t in rest)] for q in chunk]
    width = max(len(r) for r in rows)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # [row, width]
    positions = torch.zeros((len(chunk), width), dtype=torch.long)  # [row, width]
    segment = torch.full((len(chunk), width), -1, dtype=torch.long)  # [row, width]
    for row, (q, packed) in enumerate(zip(chunk, rows, strict=True)):
        ids[row, : len(packed)] = torch.tensor(packed, dtype=torch.long)
        own = len(q.prefix) - shared
        positions[row, :own] = shared + torch.arange(own)
        segment[row, :own] = 0
        at = own
        for i, rest in enumerate(q.rests):
            positions[row, at : at + len(rest)] = len(q.prefix) + torch.arange(len(rest))
            segment[row, at : at + len(rest)] = i + 1
            at += len(rest)
    return ids, positions, segment


def _packed_mask(segment: torch.Tensor, shared: int, dtype: torch.dtype) -> torch.Tensor:
    """Return the additive mask ``[row, 1, width, shared + width]``: every token sees the shared
    primer; a prompt or answer token sees the earlier tokens of its own segment and of the prompt."""
    width = segment.shape[1]
    query, key = segment[:, :, None], segment[:, None, :]  # [row, width, 1], [row, 1, width]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()  # [width, width]
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))  # [row, width, width]
    allowed |= torch.eye(width, dtype=torch.bool, device=segment.device)  # padding sees itself
    primer = torch.ones(*allowed.shape[:2], shared, dtype=torch.bool, device=segment.device)
    full = torch.cat([primer, allowed], -1)[:, None]  # [row, 1, width, shared + width]
    return torch.zeros(full.shape, dtype=dtype, device=segment.device).masked_fill(
        ~full, torch.finfo(dtype).min
    )


def _packed_chunk(
    loaded: LoadedModel,
    chunk: Sequence[ChoiceQuestion],
    primer: tuple[int, Any],
    hooks: tuple[HeadShift | None, float, _Features | None, int],
) -> list[torch.Tensor]:
    """Score one chunk of questions in one forward pass on the primer's cache: one row per
    question holding its own prompt tokens and every answer (:func:`_pack`, :func:`_packed_mask`)."""
    shared, primer_cache = primer
    shift, alpha, features, offset = hooks
    device = loaded.device
    ids, positions, segment = (t.to(device) for t in _pack(chunk, shared, pad_id(loaded.tokenizer)))
    dtype = next(loaded.model.parameters()).dtype
    mask = _packed_mask(segment, shared, dtype if dtype.is_floating_point else torch.float32)
    index = torch.zeros(len(chunk), dtype=torch.long, device=device)  # [row]
    with _answer_hooks(loaded, shift, alpha, features) as (shift_tap, read):
        if shift_tap is not None:
            shift_tap.context = segment > 0  # [row, width]: answer tokens only
        if read is not None:
            ends = [
                (j, int((segment[j] == i + 1).nonzero().max()))
                for j, q in enumerate(chunk)
                for i in range(len(q.rests))
            ]
            read.context = (
                torch.tensor([j for j, _ in ends], device=device),
                torch.tensor([c for _, c in ends], device=device),
                torch.arange(offset, offset + len(ends)),
            )
        logits = _run(loaded, ids, mask, positions, _expanded(primer_cache, index)).logits
    logits = logits.float()  # [row, width, vocab]
    lp = logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] - logits[:, :-1].logsumexp(
        -1
    )  # [row, width - 1]
    prompt_end = (segment == 0).sum(1) - 1  # [row]
    scores = []
    for j, q in enumerate(chunk):
        first_lp = logits[j, prompt_end[j]].log_softmax(-1)  # [vocab]
        at = int(prompt_end[j]) + 1
        answer_scores = []
        for rest, first in zip(q.rests, q.first, strict=True):
            token_lp = torch.cat(
                [first_lp[ids[j, at : at + 1]], lp[j, at : at + len(rest) - 1]]
            )  # [len(rest)]
            answer_scores.append(token_lp[first:].sum())
            at += len(rest)
        scores.append(torch.stack(answer_scores).cpu())
    return scores


def _full_question(
    loaded: LoadedModel,
    question: ChoiceQuestion,
    hooks: tuple[HeadShift | None, float, _Features | None, int],
) -> torch.Tensor:
    """Score one question's answers by running each prompt + answer in full (the naive way)."""
    from ...batteries.base import ProbeSequence

    shift, alpha, features, offset = hooks
    device = loaded.device
    seqs = [ProbeSequence((*question.prefix, *rest)) for rest in question.rests]
    batch = make_batch(seqs, pad_id(loaded.tokenizer))
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)  # [answer, seq]
    width, n = ids.shape[1], len(seqs)
    starts = torch.tensor(
        [width - len(s.ids) + len(question.prefix) for s in seqs], device=device
    )  # [answer]
    with _answer_hooks(loaded, shift, alpha, features) as (shift_tap, read):
        if shift_tap is not None:
            shift_tap.context = torch.arange(width, device=device)[None] >= starts[:, None]  # [answer, seq]
        if read is not None:
            read.context = (
                torch.arange(n, device=device),
                torch.full((n,), width - 1, device=device),
                torch.arange(offset, offset + n),
            )
        logits = loaded.model(
            input_ids=ids, attention_mask=mask, **padded_positions(loaded.model, mask)
        ).logits
    logp = logits.float().log_softmax(-1)  # [answer, seq, vocab]
    token_lp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].cpu()  # [answer, seq - 1]
    return torch.stack(
        [token_lp[a, int(starts[a]) + question.first[a] - 1 :].sum() for a in range(n)]
    )  # [answer]


def choice_logprobs(
    loaded: LoadedModel,
    questions: Sequence[ChoiceQuestion],
    shift: HeadShift | None = None,
    alpha: float = 0.0,
    features: bool = False,
    batch_tokens: int = 1024,
    share_prefix: bool = True,
    progress: Progress = no_progress,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Return every question's answer scores (summed log-probabilities, ``[answer]`` each; Lin et
    al. 2022) with ``shift`` at ``alpha`` on the answer tokens (Li et al. 2023), and with
    ``features`` every head's output at each answer's last token, ``[layer * head, answer, d_head]``
    (answers of all questions in order; ``None`` otherwise). A model with a sliding window shorter
    than a prompt + answer is scored the naive way (``share_prefix=False``)."""
    n_answers = sum(len(q.rests) for q in questions)
    kept = _Features(loaded, n_answers) if features else None
    window = loaded.info.sliding_window
    if window is not None and any(len(q.prefix) + max(map(len, q.rests)) > window for q in questions):
        share_prefix = False  # the packed mask has no sliding window: exact only within one
    scores: list[torch.Tensor] = []
    with torch.no_grad():
        primer = _primer(loaded, questions) if share_prefix and questions else (0, None)
        for chunk in _chunks(questions, primer[0], batch_tokens if share_prefix else 1):
            if share_prefix:
                scores.extend(
                    _packed_chunk(loaded, chunk, primer, (shift, float(alpha), kept, _done(scores)))
                )
            for question in chunk if not share_prefix else ():
                scores.append(_full_question(loaded, question, (shift, float(alpha), kept, _done(scores))))
            progress(len(scores), len(questions))
    return scores, kept.stacked() if kept is not None else None


def _done(scores: list[torch.Tensor]) -> int:
    return sum(len(s) for s in scores)


def _chunks(
    questions: Sequence[ChoiceQuestion], shared: int, budget: int
) -> Iterator[Sequence[ChoiceQuestion]]:
    """Consecutive runs of questions whose packed rows, padded to the longest, hold at most
    ``budget`` tokens (one question at least)."""
    begin = 0
    while begin < len(questions):
        end, longest = begin, 0
        while end < len(questions):
            size = len(questions[end].prefix) - shared + sum(len(r) for r in questions[end].rests)
            if end > begin and max(longest, size) * (end - begin + 1) > budget:
                break
            longest, end = max(longest, size), end + 1
        yield questions[begin:end]
        begin = end
