"""Contrastive tasks for head-level circuits: seeded, tokenizer-aware generators of clean /
counterfactual prompt pairs, and their exact encoding.

Every pair is a :class:`~.patch_tasks.PatchPair`: the clean prompt, its counterfactual (same number
of tokens, so a head's counterfactual output exists at every position), the answer the clean prompt
calls for and a wrong answer (most often the counterfactual prompt's own answer). Answers are the
exact text that follows the prompt, spacing included (``"8"`` after ``"17"``, ``" Mary"`` after
``"to"``): a pair is kept only when ``tokens(prompt + answer) = tokens(prompt) + [one token]`` for
both answers, so every answer is one token and is scored as such. The metric is the logit
difference answer − wrong at the last position (Wang et al. 2022; Mueller et al. 2025, MIB).

Tasks (all word lists are ours; ``seed`` fixes the draw):

- ``ioi``: :func:`~.patch_tasks.ioi_task` (Wang et al. 2022), kept pairs only.
- ``greater-than``: "The war lasted from the year 17YY to the year 17" (Hanna et al. 2023). For
  tokenizers that write digits one by one, the answer is the next decade digit ``Y₁ + 1`` and the
  wrong answer ``Y₁ − 1``; the counterfactual starts at ``1700 + 10·(Y₁ − 1) + …`` (two decades
  down), which makes ``Y₁ − 1`` a possible answer and ``Y₁ + 1`` a too-late one.
- ``arithmetic`` (``arithmetic:+``, ``:-``, ``:*``, ``:/``; bare ``arithmetic`` mixes + and −):
  two operands with Arabic numerals, ``"a+b="`` (Nikankin et al. 2024; MIB's arithmetic), the answer
  is the first token of the result, the counterfactual changes the operands so that its result's
  first token differs (the wrong answer).
- ``acronym``: "The Central Processing Unit (C.P." → ``"U"`` (García-Carrasco et al. 2024, in a
  dotted form so that each letter is a token; where the tokenizer merges ".U", as Qwen2.5's does,
  the spaced form "(C P" → ``" U"``); the counterfactual replaces the last word by one with
  another initial, whose letter is the wrong answer.
- ``mcqa``: a colour question with four lettered options and ``"Answer:"`` (MIB's MCQA format;
  Wiegreffe et al. 2024); the counterfactual reorders the options so the right colour sits under
  another letter, which is the wrong answer.
- ``icl`` (``icl:antonym``, ``icl:country-capital``): demonstrations ``x → y`` and a query
  (Todd et al. 2024's format, lists from :mod:`headatlas.data.words`); the counterfactual shuffles
  the labels, the wrong answer is the query word itself (copying it is what a model does without
  the mapping).
- ``sequence``: numbers ``"3,4,5,"``, days and months (Lan & Barez 2023); the counterfactual is the
  sequence one step further on, whose next item is the wrong answer.
- ``FILE.jsonl``: :func:`~.patch_tasks.read_pair_file`; answers are read exactly as written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...batteries.base import ProbeSequence
from ...core.errors import HeadatlasError, param
from ...data.sequences import sequence_frame
from ...data.words import ANTONYMS, COUNTRY_CAPITALS
from ...model.info import LoadedModel
from .patch_tasks import Encoded, PatchPair, PatchTask, ioi_task, read_pair_file

TASKS = ("ioi", "greater-than", "arithmetic", "acronym", "mcqa", "icl", "sequence")
"""Built-in circuit tasks (``arithmetic:+|-|*|/`` and ``icl:antonym|country-capital`` too)."""
DEFAULT_PAIRS = 32
_SHOTS = 3
"""Worked examples before an arithmetic question (the same ones in its counterfactual)."""
_ACRONYM_WORDS = (
    "Central", "Processing", "Unit", "National", "Security", "Agency", "World", "Health", "Organization",
    "United", "States", "Board", "Trade", "General", "Public", "Service", "Federal", "Reserve", "System",
    "Energy", "Research", "Council", "Digital", "Media", "Network", "Global", "Market", "Index", "Human",
    "Rights", "Watch", "Local", "Area", "Office", "Data", "Transfer", "Protocol", "Royal", "Air", "Force",
    "Young", "Party", "Labour", "Union", "Kingdom", "Education", "Fund", "Medical", "Center", "Language",
    "Model", "Institute", "Technology", "Bank", "Island", "Water", "Quality", "Village", "Youth", "Zone",
    "Justice", "Economic", "Forum", "Open", "Source", "Lab", "Video", "Game", "Team", "Kernel",
)  # fmt: skip
_COLOURED = (
    ("banana", "yellow"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("sky", "blue"),
    ("blood", "red"), ("orange", "orange"), ("lemon", "yellow"), ("cherry", "red"), ("milk", "white"),
    ("leaf", "green"), ("crow", "black"), ("ocean", "blue"), ("tomato", "red"), ("cucumber", "green"),
    ("night", "black"), ("cloud", "white"), ("strawberry", "red"), ("frog", "green"), ("sapphire", "blue"),
    ("pumpkin", "orange"), ("corn", "yellow"), ("chocolate", "brown"), ("soil", "brown"), ("plum", "purple"),
)  # fmt: skip
_COLOURS = ("yellow", "green", "white", "black", "blue", "red", "orange", "brown", "purple")
_LETTERS = "ABCD"
_MCQA_SHOT = "Question: What colour is a lime?\nA. red\nB. green\nC. blue\nD. white\nAnswer: B\n\n"
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_token(tokenizer: Any, prompt: str, answer: str) -> int | None:
    """Return the one token ``answer`` adds after ``prompt`` (exact text, spacing included), or
    ``None`` when ``prompt + answer`` does not tokenize as the prompt's tokens plus one token."""
    head = _ids(tokenizer, prompt)
    full = _ids(tokenizer, prompt + answer)
    if len(full) != len(head) + 1 or full[: len(head)] != head:
        return None
    return int(full[-1])


def usable(tokenizer: Any, pair: PatchPair) -> bool:
    """Return whether ``pair`` has equal-length prompts and two distinct single-token answers."""
    if len(_ids(tokenizer, pair.clean)) != len(_ids(tokenizer, pair.corrupt)):
        return False
    a, w = answer_token(tokenizer, pair.clean, pair.answer), answer_token(tokenizer, pair.clean, pair.wrong)
    return a is not None and w is not None and a != w


def _collect(
    tokenizer: Any, name: str, n: int, seed: int, draw: Callable[[np.random.Generator], PatchPair | None]
) -> tuple[PatchPair, ...]:
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    pairs: list[PatchPair] = []
    seen: set[str] = set()
    for _ in range(n * 60):
        pair = draw(rng)
        if pair is not None and pair.clean not in seen and usable(tokenizer, pair):
            pairs.append(pair)
            seen.add(pair.clean)
            if len(pairs) == n:
                return tuple(pairs)
    if len(pairs) < max(2, n // 4):
        raise HeadatlasError(
            f"the {name} task found {len(pairs)} usable pairs for this tokenizer (single-token answers, "
            "equal-length counterfactuals): give your own pairs as a .jsonl file"
        )
    return tuple(pairs)


def _greater_than(rng: np.random.Generator) -> PatchPair:
    tens, units = int(rng.integers(2, 8)), int(rng.integers(0, 10))
    low = max(0, tens - 2)
    template = "The {} lasted from the year 17{}{} to the year 17"
    noun = str(rng.choice(("war", "drought", "expedition", "famine", "reign", "siege")))
    clean = template.format(noun, tens, units)
    corrupt = template.format(noun, low, units)
    return PatchPair(clean, corrupt, str(tens + 1), str(tens - 1))


def _arithmetic(ops: str) -> Callable[[np.random.Generator], PatchPair | None]:
    def draw(rng: np.random.Generator) -> PatchPair | None:
        op = str(rng.choice(list(ops)))

        def operands() -> tuple[int, int]:
            if op == "/":
                b = int(rng.integers(2, 10))
                return b * int(rng.integers(1, 10)), b
            if op == "*":
                return int(rng.integers(2, 10)), int(rng.integers(2, 10))
            a, b = int(rng.integers(1, 30)), int(rng.integers(1, 20))
            return (a, b) if op == "+" or a >= b else (b, a)

        (a, b), (c, d) = operands(), operands()
        r, s = _OPS[op](a, b), _OPS[op](c, d)
        if str(r)[0] == str(s)[0]:
            return None
        shots = "".join(f"{x}{op}{y}={_OPS[op](x, y)}\n" for x, y in (operands() for _ in range(_SHOTS)))
        return PatchPair(f"{shots}{a}{op}{b}=", f"{shots}{c}{op}{d}=", str(r)[0], str(s)[0])

    return draw


def _acronym(rng: np.random.Generator, spaced: bool = False) -> PatchPair | None:
    words = [str(w) for w in rng.choice(_ACRONYM_WORDS, size=4, replace=False)]
    if words[2][0] == words[3][0]:
        return None
    letters = f"{words[0][0]} {words[1][0]}" if spaced else f"{words[0][0]}.{words[1][0]}."
    clean = f"The {words[0]} {words[1]} {words[2]} ({letters}"
    corrupt = f"The {words[0]} {words[1]} {words[3]} ({letters}"
    gap = " " if spaced else ""
    return PatchPair(clean, corrupt, gap + words[2][0], gap + words[3][0])


def _acronym_spaced(rng: np.random.Generator) -> PatchPair | None:
    return _acronym(rng, spaced=True)


def _mcqa(rng: np.random.Generator) -> PatchPair | None:
    thing, colour = _COLOURED[int(rng.integers(len(_COLOURED)))]
    others = [str(c) for c in rng.permutation([c for c in _COLOURS if c != colour])[:3]]
    right, other = (int(i) for i in rng.choice(4, size=2, replace=False))

    def prompt(at: int) -> str:
        options = [*others[:at], colour, *others[at:]]
        lines = "\n".join(f"{letter}. {option}" for letter, option in zip(_LETTERS, options, strict=True))
        return (
            _MCQA_SHOT
            + f"Question: What colour is {'the ' if thing in ('sky', 'ocean') else 'a '}{thing}?\n{lines}\nAnswer:"
        )

    return PatchPair(prompt(right), prompt(other), " " + _LETTERS[right], " " + _LETTERS[other])


def _icl(
    items: tuple[tuple[str, str], ...], demos: int = 6
) -> Callable[[np.random.Generator], PatchPair | None]:
    def draw(rng: np.random.Generator) -> PatchPair | None:
        chosen = [items[int(i)] for i in rng.choice(len(items), size=demos + 1, replace=False)]
        shots, (query, label) = chosen[:demos], chosen[demos]
        labels = [y for _, y in shots]
        shuffled = [str(y) for y in rng.permutation(labels)]
        if any(a == b for a, b in zip(shuffled, labels, strict=True)):
            return None
        clean = "".join(f"{x} → {y}\n" for x, y in shots) + f"{query} →"
        corrupt = "".join(f"{x} → {y}\n" for (x, _), y in zip(shots, shuffled, strict=True)) + f"{query} →"
        return PatchPair(clean, corrupt, " " + label, " " + query)

    return draw


def _sequence(rng: np.random.Generator) -> PatchPair | None:
    kind = int(rng.integers(3))
    length = int(rng.integers(3, 5))
    if kind == 0:
        start = int(rng.integers(1, 6))
        items = [str(start + i) for i in range(length + 2)]
        join, lead = ",", ""
    else:
        cycle = _DAYS if kind == 1 else _MONTHS
        start = int(rng.integers(len(cycle)))
        items = [cycle[(start + i) % len(cycle)] for i in range(length + 2)]
        join, lead = " ", " "
    clean = lead + join.join(items[:length]) + (join if kind == 0 else "")
    corrupt = lead + join.join(items[1 : length + 1]) + (join if kind == 0 else "")
    return PatchPair(clean.lstrip(), corrupt.lstrip(), lead + items[length], lead + items[length + 1])


def _icl_items(name: str) -> tuple[tuple[str, str], ...]:
    if name in ("", "antonym"):
        return ANTONYMS
    if name == "country-capital":
        return COUNTRY_CAPITALS
    raise HeadatlasError(f"unknown icl task {name!r}: use icl, icl:antonym or icl:country-capital")


def _draw(task: str) -> Callable[[np.random.Generator], PatchPair | None]:
    base, _, sub = task.partition(":")
    if base == "greater-than":
        return _greater_than
    if base == "arithmetic":
        ops = sub or "+-"
        if any(o not in _OPS for o in ops):
            raise HeadatlasError(f"unknown operator in {task!r}: use arithmetic:+, :-, :* or :/")
        return _arithmetic(ops)
    if base == "acronym":
        return _acronym
    if base == "mcqa":
        return _mcqa
    if base == "icl":
        return _icl(_icl_items(sub))
    if base == "sequence":
        return _sequence
    raise HeadatlasError(
        f"unknown {param('task')} {task!r}: use {', '.join(TASKS)}, arithmetic:+|-|*|/, "
        "icl:antonym|country-capital, or a .jsonl file"
    )


def circuit_task(tokenizer: Any, task: str, n: int = DEFAULT_PAIRS, seed: int = 0) -> PatchTask:
    """Return ``n`` seeded pairs of ``task`` (see the module docstring) that this tokenizer can score:
    single-token answers and equal-length counterfactuals. A ``.jsonl`` path reads the user's pairs.

    Raises :class:`HeadatlasError` for an unknown task, ``n < 1``, or too few usable pairs.
    """
    if n < 1:
        raise HeadatlasError(f"{param('n')} must be at least 1, got {n}")
    if Path(task).suffix == ".jsonl":
        if not Path(task).is_file():
            raise HeadatlasError(f"no pair file {task!r}: give a built-in task or an existing .jsonl file")
        return read_pair_file(task)
    if task == "ioi":
        base = ioi_task(tokenizer, n * 2, seed)
        pairs = tuple(p for p in base.pairs if usable(tokenizer, p))[:n]
    else:
        try:
            pairs = _collect(tokenizer, task, n, seed, _draw(task))
        except HeadatlasError:
            if task != "acronym":
                raise
            pairs = _collect(tokenizer, task, n, seed, _acronym_spaced)  # e.g. Qwen merges ".U"
    params = {"task": task, "n": len(pairs), "seed": seed}
    return PatchTask(task, pairs, "logit_diff", "pair", params)


def encode_exact(loaded: LoadedModel, task: PatchTask) -> Encoded:
    """Encode ``task``'s pairs as the tokenizer starts a text, the answers as the exact next token.

    Raises :class:`HeadatlasError` naming the pair whose answer is not one token after its prompt,
    whose answer equals its wrong answer, or whose prompts differ in token count.
    """
    tok = loaded.tokenizer
    frame = sequence_frame(tok)
    clean, corrupt, answers, wrongs = [], [], [], []
    for index, pair in enumerate(task.pairs):
        a = frame.wrap(_ids(tok, pair.clean), end=False)[0]
        b = frame.wrap(_ids(tok, pair.corrupt), end=False)[0]
        if len(a) != len(b):
            raise HeadatlasError(
                f"pair {index}: clean and counterfactual prompts are {len(a)} and {len(b)} tokens; "
                "a head-level circuit needs equal lengths"
            )
        answer, wrong = answer_token(tok, pair.clean, pair.answer), answer_token(tok, pair.clean, pair.wrong)
        if answer is None or wrong is None:
            raise HeadatlasError(
                f"pair {index}: the answer {pair.answer!r} or wrong answer {pair.wrong!r} is not one token "
                "right after the prompt (write answers exactly as they follow it, spacing included)"
            )
        if answer == wrong:
            raise HeadatlasError(f"pair {index}: answer and wrong answer are the same token")
        clean.append(ProbeSequence(tuple(a)))
        corrupt.append(ProbeSequence(tuple(b)))
        answers.append(answer)
        wrongs.append(wrong)
    return Encoded(clean, corrupt, torch.tensor(answers), torch.tensor(wrongs), 0)


def pairs_as_rows(task: PatchTask) -> Iterator[dict[str, str]]:
    """Yield the pairs as ``{"clean", "corrupt", "answer", "wrong"}`` rows (the JSONL format)."""
    for p in task.pairs:
        yield {"clean": p.clean, "corrupt": p.corrupt, "answer": p.answer, "wrong": p.wrong}
