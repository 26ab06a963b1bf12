"""Probing tasks: labelled positions of token sequences, split train / dev / test, and their controls.

- ``upos``, ``deprel``, ``word-start``: UD English EWT (train for fitting, dev for choosing the L2
  strength, test for the reported number; split by sentence, as the treebank is). Word labels sit
  on each word's **first piece**; ``deprel`` folds subtypes (``nmod:poss`` → ``nmod``);
  ``word-start`` labels every piece of a word (``start`` / ``continue``).
- ``truth``: true and false statements from :data:`FACTS` (a small table written for headatlas:
  capitals, chemical symbols, arithmetic, opposites), one true and one false per fact (balanced),
  split by fact; the label sits on the statement's last token.
- A JSONL file of ``{"text", "label"}`` rows (sentence level, last token) or ``{"tokens",
  "labels"}`` rows (token level, first piece of each token), split by row.

Controls (Hewitt & Liang 2019): each *type* (the word form; the token for ``word-start``; the
whole text for sentence tasks) gets one fixed label drawn from the empirical training distribution
(:func:`control_labels`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import HeadatlasError, param
from ...core.jsonl import read_jsonl
from ...data.sequences import encode_text
from ...data.ud import Sentence, read_conllu, ud_path
from ...data.words import ANTONYMS, CHEMICAL_SYMBOLS, COUNTRY_CAPITALS
from ...functional.syntax import base_relation, encode_sentence
from .truthfulqa import qa_pair, read_truthfulqa

BUILTIN_TASKS = ("upos", "deprel", "word-start", "truth")
"""Tasks headatlas builds itself; anything else must be a ``.jsonl`` file or ``TruthfulQA.csv``."""
MAX_TOKENS = 96
"""Treebank sentences with more tokens are skipped."""
SPLIT_SHARES = (0.6, 0.2, 0.2)
"""Train / dev / test shares for tasks split by fact or by row."""


@dataclass(frozen=True)
class ProbeItem:
    """One sequence: ``ids`` as the model reads them; ``positions`` (indices into ``ids``) carry
    ``labels``; ``types`` are the control task's types, one per position."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    labels: tuple[str, ...]
    types: tuple[str, ...]


@dataclass
class ProbeTask:
    """A task's items by split (``train``, ``dev``, ``test``), its classes and how it was built."""

    name: str
    level: str
    splits: dict[str, list[ProbeItem]]
    classes: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def column(self) -> str:
        """The atlas column: ``probe_<task>`` (``-`` and ``.`` become ``_``)."""
        return "probe_" + "".join(c if c.isalnum() else "_" for c in self.name.lower())

    def labels(self, split: str) -> list[str]:
        """Every label of ``split``, in item and position order."""
        return [label for item in self.splits[split] for label in item.labels]

    def types(self, split: str) -> list[str]:
        """Every control type of ``split``, in item and position order."""
        return [t for item in self.splits[split] for t in item.types]


# ---------------------------------------------------------------- facts for the truth task


@dataclass(frozen=True)
class Fact:
    """A statement ``prompt + " " + answer`` that is true; ``category`` groups facts whose answers
    can stand in for each other in a false statement."""

    category: str
    prompt: str
    answer: str


def _arithmetic() -> tuple[Fact, ...]:
    pairs = [(a, b) for a in range(2, 10) for b in range(a, 10)]
    return tuple(Fact("sum", f"{a} plus {b} equals", str(a + b)) for a, b in pairs)


FACTS: tuple[Fact, ...] = (
    *(Fact("capital", f"The capital of {country} is", city) for country, city in COUNTRY_CAPITALS),
    *(Fact("element", f"The chemical symbol of {name} is", symbol) for name, symbol in CHEMICAL_SYMBOLS),
    *(Fact("opposite", f"The opposite of {word} is", other) for word, other in ANTONYMS),
    *_arithmetic(),
)
"""Facts for the ``truth`` task and for steering, written for headatlas (public knowledge)."""


def false_answer(fact: Fact, seed: int = 0) -> str:
    """Return a fixed wrong answer for ``fact``: another answer of its category, chosen by a hash."""
    others = sorted({f.answer for f in FACTS if f.category == fact.category} - {fact.answer})
    return others[int(_unit(f"{seed}\0{fact.prompt}") * len(others))]


def split_facts(seed: int) -> dict[str, list[Fact]]:
    """Return :data:`FACTS` split train / dev / test by fact (seeded, :data:`SPLIT_SHARES`)."""
    return _split(list(FACTS), seed)


def _split(rows: list[Any], seed: int) -> dict[str, list[Any]]:
    order = np.random.default_rng(seed).permutation(len(rows))
    n_train = round(SPLIT_SHARES[0] * len(rows))
    n_dev = round(SPLIT_SHARES[1] * len(rows))
    picked = [rows[int(i)] for i in order]
    return {
        "train": picked[:n_train],
        "dev": picked[n_train : n_train + n_dev],
        "test": picked[n_train + n_dev :],
    }


def _sentence_item(tokenizer: Any, text: str, label: str) -> ProbeItem:
    ids, _ = encode_text(tokenizer, text)
    return ProbeItem(tuple(ids), (len(ids) - 1,), (label,), (text,))


def truth_task(tokenizer: Any, seed: int = 0) -> ProbeTask:
    """Return the ``truth`` task: per fact a true and a false statement, split by fact."""
    splits = {
        name: [
            item
            for fact in facts
            for item in (
                _sentence_item(tokenizer, f"{fact.prompt} {fact.answer}", "true"),
                _sentence_item(tokenizer, f"{fact.prompt} {false_answer(fact)}", "false"),
            )
        ]
        for name, facts in split_facts(seed).items()
    }
    return ProbeTask("truth", "sentence", splits, ("false", "true"), {"facts": len(FACTS), "seed": seed})


def truthfulqa_task(tokenizer: Any, path: str | Path, seed: int = 0) -> ProbeTask:
    """Return the ``truthfulqa`` task (Lin et al. 2022): every answer of every question of
    ``TruthfulQA.csv`` as ``Q: … A: …`` labelled true or false on its last token, split by question."""
    questions = read_truthfulqa(path, "task")
    splits = {
        name: [
            _sentence_item(tokenizer, qa_pair(q.question, answer), "true" if true else "false")
            for q in part
            for answer, true in zip(q.answers, q.labels, strict=True)
        ]
        for name, part in _split(questions, seed).items()
    }
    params = {"questions": len(questions), "seed": seed, "csv": str(path)}
    return ProbeTask("truthfulqa", "sentence", splits, ("false", "true"), params)


# ---------------------------------------------------------------- treebank tasks


def _unit(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` (the first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _word_labels(sentence: Sentence, task: str) -> list[str]:
    if task == "upos":
        return list(sentence.upos)
    return [base_relation(rel) for rel in sentence.deprels]


def treebank_item(tokenizer: Any, sentence: Sentence, task: str) -> ProbeItem | None:
    """Return one EWT sentence as a :class:`ProbeItem` of ``task`` (``upos``, ``deprel``,
    ``word-start``), or ``None`` when it has more than :data:`MAX_TOKENS` tokens.

    Pieces are aligned to words as the syntax battery aligns them
    (:func:`headatlas.functional.syntax.encode_sentence`); a word's label sits on its first piece.
    """
    encoded = encode_sentence(tokenizer, sentence, causal=False)
    if len(encoded.ids) > MAX_TOKENS:
        return None
    first: dict[int, int] = {}
    for index, word in enumerate(encoded.word_ids):
        if word >= 0 and word not in first:
            first[word] = index
    if task == "word-start":
        positions = [i for i, w in enumerate(encoded.word_ids) if w >= 0]
        labels = ["start" if first[encoded.word_ids[i]] == i else "continue" for i in positions]
        types = [str(encoded.ids[i]) for i in positions]
    else:
        words = sorted(first)
        positions = [first[w] for w in words]
        word_labels = _word_labels(sentence, task)
        labels = [word_labels[w] for w in words]
        types = [sentence.words[w] for w in words]
    if not positions:
        return None
    return ProbeItem(encoded.ids, tuple(positions), tuple(labels), tuple(types))


def _treebank_split(tokenizer: Any, split: str, task: str, n: int, seed: int) -> list[ProbeItem]:
    try:
        pool = list(read_conllu(ud_path("en_ewt", split)))
    except HeadatlasError as exc:
        raise HeadatlasError(f"the {task} probe needs UD English EWT: {exc}") from exc
    items: list[ProbeItem] = []
    for index in np.random.default_rng(seed).permutation(len(pool)):
        item = treebank_item(tokenizer, pool[int(index)], task)
        if item is not None:
            items.append(item)
            if len(items) >= n:
                break
    return items


def treebank_task(tokenizer: Any, task: str, n_sentences: int, seed: int = 0) -> ProbeTask:
    """Return ``task`` on EWT: ``n_sentences`` train sentences drawn with ``seed``, and half as
    many dev and test sentences (drawn with seed 0, so every seed is scored on the same test)."""
    n_eval = max(1, n_sentences // 2)
    splits = {
        "train": _treebank_split(tokenizer, "train", task, n_sentences, seed),
        "dev": _treebank_split(tokenizer, "dev", task, n_eval, 0),
        "test": _treebank_split(tokenizer, "test", task, n_eval, 0),
    }
    classes = tuple(sorted({label for items in splits.values() for item in items for label in item.labels}))
    params = {"treebank": "en_ewt", "n_sentences": n_sentences, "n_eval_sentences": n_eval, "seed": seed}
    return ProbeTask(task, "token", splits, classes, params)


# ---------------------------------------------------------------- user tasks


_ROW_SHAPE = 'each line must be {"text", "label"} or {"tokens", "labels"}'


def _bad_row(path: Path, lineno: int, why: str) -> HeadatlasError:
    return HeadatlasError(f"{path}:{lineno}: {why}; {_ROW_SHAPE}")


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = list(read_jsonl(path, hint=_ROW_SHAPE))
    if not rows:
        raise HeadatlasError(f"{param('task')} file {path} has no rows")
    return rows


def _user_item(tokenizer: Any, path: Path, lineno: int, row: dict[str, Any], level: str) -> ProbeItem:
    if level == "sentence":
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip() or label is None or isinstance(label, (list, dict)):
            raise _bad_row(path, lineno, 'a sentence row needs a non-empty "text" and a scalar "label"')
        return _sentence_item(tokenizer, text, str(label))
    tokens, labels = row.get("tokens"), row.get("labels")
    if (
        not isinstance(tokens, list)
        or not isinstance(labels, list)
        or not tokens
        or len(tokens) != len(labels)
        or not all(isinstance(t, str) and t.strip() for t in tokens)
    ):
        raise _bad_row(path, lineno, 'a token row needs "tokens" (strings) and as many "labels"')
    n = len(tokens)
    sentence = Sentence(str(lineno), " ".join(tokens), tuple(tokens), (0,) * n, ("_",) * n, ("_",) * n)
    encoded = encode_sentence(tokenizer, sentence, causal=False)
    first: dict[int, int] = {}
    for index, word in enumerate(encoded.word_ids):
        if word >= 0 and word not in first:
            first[word] = index
    words = sorted(first)
    return ProbeItem(
        encoded.ids,
        tuple(first[w] for w in words),
        tuple(str(labels[w]) for w in words),
        tuple(tokens[w] for w in words),
    )


def jsonl_task(tokenizer: Any, path: str | Path, seed: int = 0) -> ProbeTask:
    """Return the task in JSONL file ``path`` (every row of one kind), split by row with ``seed``."""
    path = Path(path)
    rows = _read_rows(path)
    level = "sentence" if "text" in rows[0][1] else "token"
    items = [_user_item(tokenizer, path, lineno, row, level) for lineno, row in rows]
    splits = _split(items, seed)
    classes = tuple(sorted({label for item in items for label in item.labels}))
    return ProbeTask(path.stem, level, splits, classes, {"file": str(path), "rows": len(items), "seed": seed})


# ---------------------------------------------------------------- building and checking


def check_task_name(task: str) -> None:
    """Raise :class:`HeadatlasError` unless ``task`` is a built-in task or an existing ``.jsonl``
    or TruthfulQA ``.csv`` file."""
    if task in BUILTIN_TASKS:
        return
    if not task.endswith((".jsonl", ".csv")):
        raise HeadatlasError(
            f"unknown {param('task')} {task!r}: use one of {', '.join(BUILTIN_TASKS)}, a .jsonl file "
            "or TruthfulQA.csv"
        )
    if not Path(task).is_file():
        raise HeadatlasError(f"{param('task')} file {task} does not exist")


def build_probe_task(tokenizer: Any, task: str, n_sentences: int = 400, seed: int = 0) -> ProbeTask:
    """Return probing task ``task`` (a name in :data:`BUILTIN_TASKS`, a ``.jsonl`` path or the path
    of TruthfulQA's ``.csv``), checked (:func:`check_task`)."""
    check_task_name(task)
    if task in ("upos", "deprel", "word-start"):
        built = treebank_task(tokenizer, task, n_sentences, seed)
    elif task == "truth":
        built = truth_task(tokenizer, seed)
    elif task.endswith(".csv"):
        built = truthfulqa_task(tokenizer, task, seed)
    else:
        built = jsonl_task(tokenizer, task, seed)
    check_task(built)
    return built


def check_task(task: ProbeTask) -> None:
    """Raise :class:`HeadatlasError` unless every split has examples and train has ≥ 2 classes."""
    for split, items in task.splits.items():
        if not any(item.positions for item in items):
            raise HeadatlasError(f"task {task.name!r} has no {split} examples: give more rows or sentences")
    found = set(task.labels("train"))
    if len(found) < 2:
        raise HeadatlasError(
            f"task {task.name!r} has one class ({next(iter(found))!r}) in its training split: "
            "a probe needs labels of at least two classes"
        )


def control_labels(types: Sequence[str], train_labels: Sequence[str], seed: int) -> list[str]:
    """Return Hewitt & Liang's control labels: each type gets one label, drawn (fixed by ``seed``
    and the type) from the empirical distribution of ``train_labels``."""
    counts = Counter(train_labels)
    classes = sorted(counts)
    cdf = np.cumsum([counts[c] for c in classes]) / len(train_labels)  # [class]
    return [
        classes[
            min(int(np.searchsorted(cdf, _unit(f"control\0{seed}\0{t}"), side="right")), len(classes) - 1)
        ]
        for t in types
    ]


def with_controls(task: ProbeTask, seed: int) -> ProbeTask:
    """Return ``task``'s control task (same items and positions, control labels)."""
    train = task.labels("train")
    splits = {
        split: [replace(item, labels=tuple(control_labels(item.types, train, seed))) for item in items]
        for split, items in task.splits.items()
    }
    return ProbeTask(
        f"{task.name}-control", task.level, splits, task.classes, {**task.params, "control": True}
    )
