"""RULER-style long-context tasks generated locally with a seed (Hsieh et al. 2024, "RULER").

Haystack: UD English EWT sentences (packaged, CC BY-SA), never a downloaded set. Tasks:

- ``niah``: one needle "One of the special magic numbers for KEY is: NUMBER." at a random depth;
- ``multikey``: the same plus three needles with other keys (distractors);
- ``multivalue``: four needles with the same key and different numbers (all must be named);
- ``vt``: variable tracking, ``VAR A = 12345. VAR B = VAR A. ...`` spread through the text; name
  every variable that holds the value.

A sample is correct when every expected string occurs in the generated text (RULER's
``string_match_all`` per sample, counted as exact match).
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...core.errors import HeadatlasError, param
from ...data.sequences import chat_frame

TASKS = ("niah", "multikey", "multivalue", "vt")


def check_tasks(tasks: Sequence[str]) -> None:
    """Raise :class:`HeadatlasError` unless ``tasks`` names at least one task, each of :data:`TASKS`."""
    if not tasks or any(t not in TASKS for t in tasks):
        raise HeadatlasError(
            f"{param('tasks')} must be some of {', '.join(TASKS)}, got {', '.join(tasks) or 'none'}"
        )


_KEYS = (
    "apple", "river", "candle", "falcon", "garden", "harbor", "island", "jacket", "kettle", "lantern",
    "meadow", "needle", "orange", "pepper", "quartz", "rabbit", "saddle", "tiger", "violin", "walnut",
    "anchor", "basket", "copper", "dragon", "ember", "forest", "glacier", "hammer", "ivory", "jungle",
)  # fmt: skip
_NEW_TOKENS = {"niah": 12, "multikey": 12, "multivalue": 40, "vt": 30}


@dataclass(frozen=True)
class Sample:
    """One prompt (chat-framed text), the strings the answer must contain, and the task."""

    task: str
    prompt: str
    expected: tuple[str, ...]
    max_new_tokens: int

    def correct(self, output: str) -> bool:
        """Whether every expected string occurs in ``output``."""
        return all(value in output for value in self.expected)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _body(task: str, rng: random.Random) -> tuple[list[str], str, str, tuple[str, ...]]:
    """Needle sentences, the question, the answer prefix and the expected strings of one sample."""
    if task == "vt":
        names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(5)]
        value = str(rng.randint(10_000, 99_999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables are assigned the value {value}, they are:"
        return chain, question, prefix, tuple(names)
    keys = rng.sample(_KEYS, 4)
    key = keys[0]
    if task == "multivalue":
        values = [_number(rng) for _ in range(4)]
        needles = [_needle(key, v) for v in values]
        question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        return (
            needles,
            question,
            f"The special magic numbers for {key} mentioned in the provided text are",
            tuple(values),
        )
    value = _number(rng)
    needles = [_needle(key, value)]
    if task == "multikey":
        needles += [_needle(k, _number(rng)) for k in keys[1:]]
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    return (
        needles,
        question,
        f"The special magic number for {key} mentioned in the provided text is",
        (value,),
    )


def make_samples(
    tokenizer: Any, task: str, length: int, n: int, seed: int | str = 0, haystack: list[str] | None = None
) -> list[Sample]:
    """Return ``n`` samples of ``task`` whose prompts are about ``length`` tokens (seeded).

    ``haystack`` sentences default to UD English EWT's train split.
    """
    if task not in TASKS:
        raise HeadatlasError(f"unknown task {task!r} in {param('tasks')}: use {', '.join(TASKS)}")
    if length < 64 or n < 1:
        raise HeadatlasError(f"{param('lengths')} must be ≥ 64 and {param('n')} ≥ 1, got {length} and {n}")
    if haystack is None:
        from ...data.ud import ewt_sentences

        haystack = ewt_sentences("train")
    frame = chat_frame(tokenizer)
    rng = random.Random(f"{seed}-{task}-{length}")
    sizes: dict[int, int] = {}
    samples = []
    for _ in range(n):
        needles, question, prefix, expected = _body(task, rng)
        intro = (
            "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n"
            if task != "vt"
            else "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
        )
        fixed = len(tokenizer(intro + " ".join(needles) + question + prefix)["input_ids"]) + 16
        start = rng.randrange(len(haystack))
        chosen: list[str] = []
        used = fixed
        i = start
        while used < length:
            j = i % len(haystack)
            sentence = haystack[j]
            if j not in sizes:
                sizes[j] = len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
            used += sizes[j]
            chosen.append(sentence)
            i += 1
        for needle in needles:  # depths drawn uniformly, in order for variable tracking
            chosen.insert(rng.randint(0, len(chosen)), needle)
        if task == "vt":
            order = [s for s in chosen if s.startswith("VAR ")]
            it = iter(needles)
            chosen = [next(it) if s in order else s for s in chosen]
        user = intro + " ".join(chosen) + "\n" + question
        text = f"{frame.before}{user}{frame.after}{prefix}" if frame else f"{user}\n{prefix}"
        samples.append(Sample(task, text, expected, _NEW_TOKENS[task]))
    return samples
