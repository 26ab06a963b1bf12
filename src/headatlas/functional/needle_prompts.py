"""Needle-in-a-haystack trials for the ``needle`` battery: prompts with exact token spans.

A trial is a haystack of UD English EWT training sentences (seeded draw) with one *needle*
sentence inserted at a sentence boundary at a given depth, followed by a question whose answer is
the needle's *value* (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality", after Kamradt's needle-in-a-haystack test). Unlike the reference implementation,
which re-tokenises the decoded context and then looks for the needle by token-set overlap, every
piece here (chat-template prefix, each sentence, the needle's lead / value / tail, the question,
the template suffix) is tokenised on its own and the ids are concatenated, so the value's span in
the prompt is known exactly.

The needles are our own: three templates whose value (a six-digit number, an activity, a code
word pair) is drawn at random per trial, short enough for a 135M instruct model to have a chance
of recalling them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import HeadatlasError
from ..data.sequences import chat_frame, sequence_frame

DEFAULT_LENGTHS: tuple[int, ...] = (256, 512, 1024)
"""Prompt lengths in tokens (capped by ``max_len`` and the model's context)."""
DEFAULT_DEPTHS: tuple[float, ...] = (0.1, 0.5, 0.9)
"""Where the needle goes, as a fraction of the haystack's tokens."""

_CITIES = (
    "Paris", "Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Madrid", "Vienna", "Prague", "Tokyo",
    "Nairobi", "Sydney", "Toronto", "Berlin", "Athens", "Rome",
)  # fmt: skip
_ACTIVITIES = (
    "eat a sandwich", "ride a bicycle", "drink hot chocolate", "fly a kite", "read a book",
    "watch the boats", "paint the sunset", "feed the ducks",
)  # fmt: skip
_PLACES = (
    "by the river", "in the old market", "on the hill", "near the castle", "at the harbour",
    "in the rose garden",
)  # fmt: skip
_NAMES = ("Anna", "Omar", "Lena", "Victor", "Maya", "Hugo", "Iris", "Felix", "Nora", "Oscar")
_COLOURS = ("purple", "golden", "silver", "green", "orange", "crimson", "blue", "white")
_ANIMALS = ("elephant", "falcon", "tiger", "dolphin", "penguin", "giraffe", "rabbit", "wolf")


@dataclass(frozen=True)
class Needle:
    """One needle: the sentence as ``lead + value + tail``, its question and its answer value.

    ``lead`` ends before the value's leading space; ``value`` starts with a space (so the value is
    tokenised as it reads mid-sentence); ``answer`` is the value without that space.
    """

    template: str
    lead: str
    value: str
    tail: str
    question: str

    @property
    def answer(self) -> str:
        """The value as the answer text (no leading space)."""
        return self.value.strip()

    @property
    def sentence(self) -> str:
        """The whole needle sentence."""
        return self.lead + self.value + self.tail


TEMPLATES: tuple[str, ...] = ("number", "activity", "codeword")
"""The needle templates, in trial order."""


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def make_needle(template: str, rng: np.random.Generator) -> Needle:
    """Return a needle of ``template`` (``number``, ``activity`` or ``codeword``) with random content."""
    if template == "number":
        city = _pick(rng, _CITIES)
        return Needle(
            template,
            f"The special magic number of {city} is",
            f" {int(rng.integers(100000, 1000000))}",
            ".",
            f"What is the special magic number of {city}?",
        )
    if template == "activity":
        city = _pick(rng, _CITIES)
        return Needle(
            template,
            f"The best thing to do in {city} is to",
            f" {_pick(rng, _ACTIVITIES)} {_pick(rng, _PLACES)}",
            ".",
            f"What is the best thing to do in {city}?",
        )
    if template == "codeword":
        name = _pick(rng, _NAMES)
        return Needle(
            template,
            f"The secret code word of {name} is",
            f" {_pick(rng, _COLOURS)} {_pick(rng, _ANIMALS)}",
            ".",
            f"What is the secret code word of {name}?",
        )
    raise HeadatlasError(f"unknown needle template {template!r}: use one of {', '.join(TEMPLATES)}")


@dataclass(frozen=True)
class Trial:
    """One needle-in-a-haystack prompt.

    Attributes:
        ids: prompt token ids ``[key]`` (chat template or plain format, ready to decode from).
        span: ``(start, end)`` of the needle's value tokens in ``ids`` (end exclusive), leading
            whitespace-only tokens excluded: the positions a retrieval head copies from.
        needle_span: ``(start, end)`` of the whole needle sentence in ``ids``.
        answer_ids: the value's token ids as they appear in the prompt (``ids[span]``).
        gold_ids: the teacher-forced answer: the needle sentence's lead (no leading space) then the
            value tokens exactly as in the needle, e.g. ``"The special magic number of Paris is
            482913"`` — the form in which instruct models answer (they echo the lead).
        gold_value: ``(start, end)`` of the value tokens (``answer_ids``) within ``gold_ids``.
        needle: the needle (template, text, question).
        length: the target prompt length of the grid cell (the prompt is at most this long).
        depth: the needle's target depth as a fraction of the haystack.
    """

    ids: tuple[int, ...]
    span: tuple[int, int]
    needle_span: tuple[int, int]
    answer_ids: tuple[int, ...]
    gold_ids: tuple[int, ...]
    gold_value: tuple[int, int]
    needle: Needle
    length: int
    depth: float


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


INTRO = "Read the text, then answer the question after it.\n\nText:"
"""What the user message starts with; every haystack sentence and the needle follow with a space."""


def prompt_start(tokenizer: Any) -> str:
    """Return how the needle prompts of ``tokenizer`` start, for the atlas metadata."""
    frame = chat_frame(tokenizer)
    return frame.start if frame is not None else sequence_frame(tokenizer).start


def question_text(needle: Needle, chat: bool) -> str:
    """Return the text after the haystack: the question (plus ``Answer:`` in the plain format)."""
    ask = f"\n\nQuestion: {needle.question}"
    return ask if chat else ask + "\nAnswer:"


def _is_blank(tokenizer: Any, token: int) -> bool:
    return not str(tokenizer.decode([token])).strip()


def build_trial(
    tokenizer: Any,
    corpus: Sequence[str],
    needle: Needle,
    length: int,
    depth: float,
    rng: np.random.Generator,
) -> Trial:
    """Return one :class:`Trial` of at most ``length`` tokens with ``needle`` at ``depth``.

    Haystack sentences are drawn from ``corpus`` in a random order (``rng``), skipping those that
    would overflow ``length``, until fewer than 4 tokens are left; the needle goes at the sentence
    boundary nearest ``depth`` of the haystack's tokens. The prompt starts as the rendered chat
    template starts, or, without a template, as the tokenizer starts a text
    (:mod:`headatlas.data.sequences`); it has no end token, since the model continues it. Raises :class:`HeadatlasError` when the
    fixed parts (template, needle, question) alone do not fit.
    """
    frame = chat_frame(tokenizer)
    chat = frame is not None
    head = _encode(tokenizer, frame.before) if frame else list(sequence_frame(tokenizer).prefix)
    head += _encode(tokenizer, INTRO)
    tail = _encode(tokenizer, question_text(needle, chat)) + (
        _encode(tokenizer, frame.after) if frame else []
    )
    # the needle sentence is tokenised in three pieces so the value's span is exact
    pieces = [_encode(tokenizer, " " + needle.lead), _encode(tokenizer, needle.value)]
    pieces.append(_encode(tokenizer, needle.tail))
    fixed = len(head) + len(tail) + sum(len(p) for p in pieces)
    if fixed > length:
        raise HeadatlasError(
            f"the needle prompt needs {fixed} tokens without any haystack but only {length} are "
            "allowed: raise --max-len or use a model with a longer context"
        )
    budget = length - fixed
    sentences: list[list[int]] = []
    used = 0
    for index in rng.permutation(len(corpus))[: 2 * budget + 16]:  # a sentence is ≥ 1 token
        ids = _encode(tokenizer, " " + corpus[int(index)].strip())
        if used + len(ids) <= budget:  # skip sentences that would overflow, fill up the rest
            sentences.append(ids)
            used += len(ids)
        if budget - used < 4:
            break
    bounds = np.cumsum([0] + [len(s) for s in sentences])  # [sentence + 1] token offsets
    at = int(np.argmin(np.abs(bounds - depth * used)))
    before_ids = head + [t for s in sentences[:at] for t in s]
    start = len(before_ids) + len(pieces[0])
    value = pieces[1]
    skip = 0
    while skip < len(value) - 1 and _is_blank(tokenizer, value[skip]):
        skip += 1
    span = (start + skip, start + len(value))
    answer_lead = _encode(tokenizer, needle.lead)
    ids = before_ids + pieces[0] + value + pieces[2]
    needle_span = (len(before_ids), len(ids))
    ids += [t for s in sentences[at:] for t in s] + tail
    return Trial(
        ids=tuple(ids),
        span=span,
        needle_span=needle_span,
        answer_ids=tuple(ids[span[0] : span[1]]),
        gold_ids=tuple(answer_lead + value),
        gold_value=(len(answer_lead) + skip, len(answer_lead) + len(value)),
        needle=needle,
        length=length,
        depth=float(depth),
    )


def build_trials(
    tokenizer: Any,
    corpus: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    templates: Sequence[str] = TEMPLATES,
    seed: int = 0,
    n_trials: int | None = None,
) -> list[Trial]:
    """Return the seeded grid of trials: every length × depth × template (the same on every call).

    Each grid cell has its own random stream (``seed`` and the cell's index), so capping the
    number of trials with ``n_trials`` (an evenly spread subset of the grid, in grid order) does
    not change the trials that remain.
    """
    if not corpus:
        raise HeadatlasError("the needle haystack corpus is empty: install the UD EWT data (`make data`)")
    grid = [(length, depth, t) for length in lengths for depth in depths for t in templates]
    chosen: list[int] = list(range(len(grid)))
    if n_trials is not None and n_trials < len(grid):
        if n_trials < 1:
            raise HeadatlasError(f"n_prompts {n_trials} is too small for the needle battery: use at least 1")
        chosen = sorted({int(x) for x in np.rint(np.linspace(0, len(grid) - 1, n_trials))})
    trials = []
    for index in chosen:
        length, depth, template = grid[index]
        rng = np.random.default_rng([seed, index])
        trials.append(build_trial(tokenizer, corpus, make_needle(template, rng), length, depth, rng))
    return trials


_WORD = re.compile(r"\w+")


def rouge1_recall(reference: str, response: str) -> float:
    """Return ROUGE-1 recall: the share of ``reference``'s words (with multiplicity) found in ``response``.

    Words are lower-cased ``\\w+`` runs, without stemming (Wu et al. use ``rouge_score`` with a
    Porter stemmer; the needle values here are numbers and plain words, so it makes no difference
    for them). Returns 0.0 for an empty reference.
    """
    ref = Counter(_WORD.findall(reference.lower()))
    got = Counter(_WORD.findall(response.lower()))
    total = sum(ref.values())
    return sum(min(n, got[w]) for w, n in ref.items()) / total if total else 0.0


def contains_value(answer: str, response: str) -> bool:
    """Return whether ``response`` contains ``answer`` (case- and whitespace-insensitive)."""

    def norm(text: str) -> str:
        return " ".join(_WORD.findall(text.lower()))

    return f" {norm(answer)} " in f" {norm(response)} "
