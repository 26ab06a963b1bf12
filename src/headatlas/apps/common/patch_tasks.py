"""Contrastive prompt pairs for patching: the built-in tasks and the JSONL pair format.

A :class:`PatchPair` is a clean prompt, a corrupted one, the answer the clean prompt calls for and
a wrong answer. The metric of a pair is the logit difference ``answer − wrong`` at the last
position (Wang et al. 2022), or, for the function-vector tasks, the probability of the answer
(Todd et al. 2024).

Built-in tasks (seeded; all word lists are ours):

- ``ioi``: indirect-object identification (Wang et al. 2022, "Interpretability in the Wild"):
  "When Mary and John went to the store, John gave a drink to" → " Mary" (the indirect object),
  wrong " John" (the subject). Half ABBA, half BABA. The corrupted prompt replaces the three names
  by three other names (Wang et al.'s ABC distribution); answer and wrong stay the clean names.
- ``fv:<task>`` (Todd et al. 2024, "Function Vectors in Large Language Models"): ten ``x → y``
  demonstrations and a query, for ``antonym``, ``capitalize``, ``country-capital`` and
  ``translate`` (English → French, from the ``translate`` battery's word list). The corrupted
  prompt shuffles the demonstrations' labels; the answer is the query's label. They are scored by
  the answer's probability; their wrong answer (another label of the task) only serves a
  logit-difference metric.

Answers are read as the tokens that would follow the prompt: an answer without leading whitespace
gets a space when the prompt does not end in one. A multi-token answer is scored on its first
token (the metadata counts how many were).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...batteries.base import ProbeSequence, make_batch, pad_id
from ...capture import padded_positions
from ...core.errors import HeadatlasError, param
from ...core.jsonl import read_jsonl
from ...data.sequences import sequence_frame
from ...data.words import ANTONYMS, CAPITALIZE_WORDS, COUNTRY_CAPITALS, load_word_pairs
from ...model.info import LoadedModel

logger = logging.getLogger(__name__)

METRICS = ("logit_diff", "prob")


@dataclass(frozen=True)
class PatchPair:
    """One contrastive pair: prompts and answers as text."""

    clean: str
    corrupt: str
    answer: str
    wrong: str


@dataclass(frozen=True)
class PatchTask:
    """A named set of pairs and how they are scored.

    Attributes:
        name: ``ioi``, ``fv:antonym``, … or a file's stem; the atlas column is ``patch_<column>``.
        pairs: the pairs.
        metric: ``"logit_diff"`` (answer − wrong) or ``"prob"`` (probability of the answer).
        source: ``"pair"`` (patch each pair's own clean output) or ``"mean"`` (patch the mean clean
            output over all pairs: Todd et al.'s causal indirect effect).
        params: what produced the pairs, for ``atlas.json``.
    """

    name: str
    pairs: tuple[PatchPair, ...]
    metric: str = "logit_diff"
    source: str = "pair"
    params: dict[str, Any] | None = None

    @property
    def column(self) -> str:
        """The atlas column: ``patch_ioi``, ``patch_fv_antonym``, ``patch_<file stem>``."""
        safe = "".join(c if c.isalnum() else "_" for c in self.name.lower()).strip("_")
        return f"patch_{safe}"


_NAMES = (
    "Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "David", "Emma", "Paul", "Anna", "Mark",
    "Laura", "Peter", "Kate", "Mike", "Lisa", "Jack", "Susan", "Dan", "Amy", "Chris", "Jane", "Sam",
)  # fmt: skip
_PLACES = ("store", "park", "school", "station", "restaurant", "office", "garden", "hospital", "market")
_OBJECTS = ("drink", "book", "ring", "key", "letter", "bag", "flower", "ball", "kiss", "snack")
_IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {C} gave a {obj} to",
    "Then, {A} and {B} had a long argument, and afterwards {C} said to",
    "After {A} and {B} went to the {place}, {C} gave a {obj} to",
    "While {A} and {B} were working at the {place}, {C} gave a {obj} to",
    "Friends {A} and {B} found a {obj} at the {place}. {C} gave it to",
    "When {A} and {B} got a {obj} at the {place}, {C} decided to give it to",
    "{A} and {B} were at the {place}. {C} handed a {obj} to",
    "Then, {A} and {B} went to the {place}. {C} gave a {obj} to",
)

FV_TASKS = ("antonym", "capitalize", "country-capital", "translate")
N_DEMOS = 10
DEFAULT_PAIRS = 24


def _single_token_names(tokenizer: Any) -> list[str]:
    return [n for n in _NAMES if len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) == 1]


def ioi_task(tokenizer: Any, n: int = DEFAULT_PAIRS, seed: int = 0) -> PatchTask:
    """Return ``n`` seeded IOI pairs (half ABBA, half BABA) with single-token names (Wang et al. 2022)."""
    names = _single_token_names(tokenizer)
    if len(names) < 5:
        raise HeadatlasError(
            "the ioi task needs 5 names that are single tokens for this tokenizer: it has fewer"
        )
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        template = _IOI_TEMPLATES[int(rng.integers(len(_IOI_TEMPLATES)))]
        a, b, c, d, e = (str(x) for x in rng.choice(names, size=5, replace=False))
        place, obj = str(rng.choice(_PLACES)), str(rng.choice(_OBJECTS))
        io, s = (a, b)
        first, second = (io, s) if i % 2 == 0 else (s, io)  # ABBA, then BABA
        clean = template.format(A=first, B=second, C=s, place=place, obj=obj)
        corrupt = template.format(A=c, B=d, C=e, place=place, obj=obj)
        pairs.append(PatchPair(clean, corrupt, " " + io, " " + s))
    params = {"task": "ioi", "n": n, "seed": seed, "templates": len(_IOI_TEMPLATES), "names": len(names)}
    return PatchTask("ioi", tuple(pairs), "logit_diff", "pair", params)


def _fv_items(task: str) -> list[tuple[str, str]]:
    if task == "antonym":
        return list(ANTONYMS)
    if task == "country-capital":
        return list(COUNTRY_CAPITALS)
    if task == "capitalize":
        return [(w, w.capitalize()) for w in CAPITALIZE_WORDS]
    if task == "translate":
        words = load_word_pairs()
        return words.pair("fr")
    raise HeadatlasError(f"unknown function-vector task {task!r}: use one of {', '.join(FV_TASKS)}")


def fv_task(task: str, n: int = DEFAULT_PAIRS, seed: int = 0) -> PatchTask:
    """Return ``n`` seeded function-vector prompts for ``task`` (Todd et al. 2024): ten ``x → y``
    demonstrations and a query; the corrupted prompt shuffles the demonstrations' labels."""
    items = _fv_items(task)
    rng = np.random.default_rng([seed, FV_TASKS.index(task)])
    pairs = []
    for _ in range(n):
        chosen = [items[int(i)] for i in rng.choice(len(items), size=N_DEMOS + 1, replace=False)]
        demos, (query, label) = chosen[:N_DEMOS], chosen[N_DEMOS]
        shuffled = [y for _, y in demos]
        while len(shuffled) > 1 and any(a == b for a, b in zip(shuffled, [y for _, y in demos], strict=True)):
            rng.shuffle(shuffled)
        clean = "\n".join(f"{x} → {y}" for x, y in demos) + f"\n{query} →"
        corrupt = "\n".join(f"{x} → {y}" for (x, _), y in zip(demos, shuffled, strict=True)) + f"\n{query} →"
        pairs.append(PatchPair(clean, corrupt, " " + label, " " + demos[0][1]))
    params = {"task": f"fv:{task}", "n": n, "seed": seed, "demonstrations": N_DEMOS, "items": len(items)}
    return PatchTask(f"fv:{task}", tuple(pairs), "prob", "mean", params)


def read_pair_file(path: str | Path) -> PatchTask:
    """Read a JSONL pair file (``{"clean", "corrupt", "answer", "wrong"}`` per line) as a task.

    Raises :class:`HeadatlasError` naming the line for a malformed row, an empty file, or a row
    whose answer equals its wrong answer.
    """
    file = Path(path)
    pairs = []
    for number, row in read_jsonl(file, hint="write one object per line"):
        fields = ("clean", "corrupt", "answer", "wrong")
        if not all(isinstance(row.get(k), str) and row.get(k) for k in fields):
            raise HeadatlasError(f"{file}:{number} needs non-empty strings {', '.join(fields)}")
        if row["answer"].strip() == row["wrong"].strip():
            raise HeadatlasError(
                f"{file}:{number}: the answer equals the wrong answer, so there is nothing to measure"
            )
        pairs.append(PatchPair(row["clean"], row["corrupt"], row["answer"], row["wrong"]))
    if not pairs:
        raise HeadatlasError(f"{file} holds no pairs: write one JSON object per line")
    return PatchTask(file.stem, tuple(pairs), "logit_diff", "pair", {"task": str(file), "n": len(pairs)})


def build_task(tokenizer: Any, task: str, n: int = DEFAULT_PAIRS, seed: int = 0) -> PatchTask:
    """Return the task named ``task``: ``ioi``, ``fv:<name>``, or a path to a JSONL pair file."""
    if n < 1:
        raise HeadatlasError(f"{param('n')} must be at least 1, got {n}")
    if task == "ioi":
        return ioi_task(tokenizer, n, seed)
    if task.startswith("fv:"):
        return fv_task(task[3:], n, seed)
    if Path(task).suffix == ".jsonl" or Path(task).exists():
        if not Path(task).is_file():
            raise HeadatlasError(f"no pair file {task!r}: give ioi, fv:<task> or a .jsonl file")
        return read_pair_file(task)
    raise HeadatlasError(
        f"unknown {param('task')} {task!r}: use ioi, {', '.join('fv:' + t for t in FV_TASKS)} or a .jsonl file"
    )


# ---------------------------------------------------------------- encoding and the metric


@dataclass
class Encoded:
    """A task's pairs as token ids: left-padded batches and the answer / wrong token per pair."""

    clean: list[ProbeSequence]
    corrupt: list[ProbeSequence]
    answer: torch.Tensor  # [pair]
    wrong: torch.Tensor  # [pair]
    multi_token: int


def _answer_token(tokenizer: Any, prompt: str, answer: str) -> tuple[int, bool]:
    text = answer if answer[:1].isspace() or prompt[-1:].isspace() else " " + answer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise HeadatlasError(f"the answer {answer!r} encodes to no tokens")
    return int(ids[0]), len(ids) > 1


def encode_task(loaded: LoadedModel, task: PatchTask, position: str) -> Encoded:
    """Encode every pair as the tokenizer starts a text (no end token: the model continues it).

    Raises :class:`HeadatlasError` for ``position="all"`` when a pair's clean and corrupted prompts
    have different token counts (positions would not correspond), or when answer and wrong answer
    share their first token.
    """
    tok = loaded.tokenizer
    frame = sequence_frame(tok)
    clean, corrupt, answers, wrongs, multi = [], [], [], [], 0
    for index, pair in enumerate(task.pairs):
        a = frame.wrap(tok(pair.clean, add_special_tokens=False)["input_ids"], end=False)[0]
        b = frame.wrap(tok(pair.corrupt, add_special_tokens=False)["input_ids"], end=False)[0]
        if position == "all" and len(a) != len(b):
            raise HeadatlasError(
                f"pair {index}: clean and corrupted prompts are {len(a)} and {len(b)} tokens; "
                "patching every position needs equal lengths (use position last)"
            )
        answer, long_a = _answer_token(tok, pair.clean, pair.answer)
        wrong, long_w = _answer_token(tok, pair.clean, pair.wrong)
        if answer == wrong and task.metric == "logit_diff":
            raise HeadatlasError(f"pair {index}: answer and wrong answer start with the same token")
        multi += int(long_a or long_w)
        clean.append(ProbeSequence(tuple(a)))
        corrupt.append(ProbeSequence(tuple(b)))
        answers.append(answer)
        wrongs.append(wrong)
    if multi:
        logger.info(
            "%d of %d pairs have multi-token answers: scored on their first token", multi, len(task.pairs)
        )
    return Encoded(clean, corrupt, torch.tensor(answers), torch.tensor(wrongs), multi)


def metric(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor, kind: str) -> torch.Tensor:
    """Return the per-row metric ``[row]`` of last-position ``logits [row, vocab]``: the logit
    difference answer − wrong, or the probability of the answer (``kind="prob"``)."""
    if kind == "prob":
        return torch.softmax(logits.float(), -1).gather(1, answer[:, None])[:, 0]
    return (logits.gather(1, answer[:, None]) - logits.gather(1, wrong[:, None]))[:, 0].float()


def last_logits(loaded: LoadedModel, seqs: list[ProbeSequence], **kwargs: Any) -> torch.Tensor:
    """Forward ``seqs`` (left-padded) and return last-position logits ``[batch, vocab]``."""
    batch = make_batch(seqs, pad_id(loaded.tokenizer))
    device = loaded.device
    mask = batch.attention_mask.to(device)
    out = loaded.model(
        input_ids=batch.input_ids.to(device),
        attention_mask=mask,
        **padded_positions(loaded.model, mask),
        **kwargs,
    )
    return out.logits[:, -1]  # [batch, vocab]


def task_metric(loaded: LoadedModel, task: PatchTask) -> float:
    """Return the task's mean metric on its clean prompts (logit difference or answer probability):
    what ``headatlas verify`` compares with heads ablated. Higher is better."""
    enc = encode_task(loaded, task, "last")
    device = loaded.device
    with torch.no_grad():
        logits = last_logits(loaded, enc.clean)
    return float(metric(logits, enc.answer.to(device), enc.wrong.to(device), task.metric).mean())
