"""TruthfulQA (Lin et al. 2022, "TruthfulQA: Measuring How Models Mimic Human Falsehoods"): the
questions of ``TruthfulQA.csv``, read from a path the user gives (the file is not shipped; it is
Apache-2.0, at github.com/sylinrl/TruthfulQA), and the paper's "Q: … A: …" prompt format.

- :func:`read_truthfulqa`: one :class:`TruthfulQuestion` per row. Answers are the ``;``-separated
  lists of the ``Correct Answers`` and ``Incorrect Answers`` columns, stripped, each ending with a
  period (as the paper's code closes them); the ``Best Answer`` is one of the true answers (added
  first when the list misses it).
- :data:`PRIMER`: six question–answer pairs written for headatlas. The paper's ``qa`` primer has
  the same format and a different text.
- :func:`qa_prompt`: the primer, a blank line, ``Q: <question>`` and ``A:``; an answer is scored
  as the tokens of ``" " + answer`` after it.
- :func:`qa_pair`: ``Q: <question> A: <answer>``, the bare pair whose last token carries a probe's
  features (as Li et al. 2023's ITI code reads them).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...core.errors import HeadatlasError, param

COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
"""The columns :func:`read_truthfulqa` needs (the file also has Type, Category and Source)."""
SOURCE = "github.com/sylinrl/TruthfulQA"
"""Where users get ``TruthfulQA.csv``."""
PRIMER = "\n\n".join(
    (
        "Q: How many legs does a spider have?\nA: A spider has eight legs.",
        "Q: At what temperature does water boil at sea level?\nA: Water boils at 100 degrees Celsius at sea level.",
        "Q: Who wrote the play Romeo and Juliet?\nA: William Shakespeare wrote Romeo and Juliet.",
        "Q: What is the largest planet in the solar system?\nA: Jupiter is the largest planet in the solar system.",
        "Q: What colour do you get when you mix blue and yellow paint?\nA: Mixing blue and yellow paint gives green.",
        "Q: What happens if you whistle indoors at night?\nA: Nothing in particular happens if you whistle indoors at night.",
    )
)
"""The few-shot primer, written for headatlas in the TruthfulQA paper's format (its own text differs)."""


@dataclass(frozen=True)
class TruthfulQuestion:
    """One TruthfulQA question: ``answers`` holds the true answers first (``n_true`` of them, the
    best at ``best``), then the false ones."""

    question: str
    answers: tuple[str, ...]
    n_true: int
    best: int
    category: str = ""

    @property
    def labels(self) -> tuple[bool, ...]:
        """Whether each answer is true, in :attr:`answers` order."""
        return tuple(i < self.n_true for i in range(len(self.answers)))


def _close(answer: str) -> str:
    answer = answer.strip()
    return answer if answer.endswith(".") else answer + "."


def split_answers(text: str) -> list[str]:
    """Return the ``;``-separated answers of a cell, stripped, non-empty, each ending with a period."""
    return [_close(part) for part in text.split(";") if part.strip()]


def _row(path: Path, line: int, row: dict[str, str | None], name: str) -> TruthfulQuestion:
    cells = {name: (row.get(name) or "").strip() for name in COLUMNS}
    for column in COLUMNS:
        if not cells[column]:
            raise HeadatlasError(f"{param(name)} {path} line {line}: the {column!r} cell is empty")
    true = split_answers(cells["Correct Answers"])
    false = split_answers(cells["Incorrect Answers"])
    if not true or not false:
        raise HeadatlasError(
            f"{param(name)} {path} line {line}: a question needs correct and incorrect answers"
        )
    best = _close(cells["Best Answer"])
    if best not in true:
        true.insert(0, best)
    return TruthfulQuestion(
        cells["Question"], (*true, *false), len(true), true.index(best), (row.get("Category") or "").strip()
    )


def read_truthfulqa(path: str | Path, name: str = "csv") -> list[TruthfulQuestion]:
    """Return the questions of ``TruthfulQA.csv`` at ``path`` (Lin et al. 2022), in file order.

    Raises :class:`HeadatlasError` (naming parameter ``name``) for a missing or unreadable file,
    missing columns, or a row without a question, a best answer, correct or incorrect answers."""
    where = Path(path)
    if not where.is_file():
        raise HeadatlasError(
            f"{param(name)} {where} does not exist: download TruthfulQA.csv from {SOURCE} and give its path"
        )
    try:
        with where.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [name for name in COLUMNS if name not in (reader.fieldnames or [])]
            if missing:
                raise HeadatlasError(
                    f"{param(name)} {where} has no {missing[0]!r} column: give TruthfulQA.csv from {SOURCE} "
                    f"(columns {', '.join(COLUMNS)})"
                )
            questions = [_row(where, reader.line_num, row, name) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise HeadatlasError(
            f"{param(name)} {where} is not a readable UTF-8 CSV ({exc.__class__.__name__}): give TruthfulQA.csv"
        ) from None
    if not questions:
        raise HeadatlasError(f"{param(name)} {where} has no questions")
    return questions


def qa_prompt(question: str) -> str:
    """Return the scoring prompt: :data:`PRIMER`, then ``Q: <question>`` and ``A:`` on their own lines."""
    return f"{PRIMER}\n\nQ: {question}\nA:"


def qa_pair(question: str, answer: str) -> str:
    """Return ``Q: <question> A: <answer>``: the text whose last token a probe reads."""
    return f"Q: {question} A: {answer}"


def question_folds(n_questions: int, n_folds: int, seed: int) -> list[np.ndarray]:
    """Return ``n_folds`` disjoint arrays of question indices covering ``0 .. n_questions − 1``
    (a permutation by ``seed``, cut into near-equal parts, each part sorted)."""
    order = np.random.default_rng(seed).permutation(n_questions)
    return [np.sort(part) for part in np.array_split(order, n_folds)]
