"""The knowledge-conflict set: facts the model demonstrably knows, each given a context that says
otherwise (Jin et al. 2024, "Cutting Off the Head Ends the Conflict").

A fact is a prompt and its answer from headatlas's own fact list
(:data:`headatlas.apps.common.probe_tasks.FACTS`: country capitals, chemical symbols, opposites,
small sums). It is *known* when the model, given the prompt alone, ranks the answer's first token
first. Each known fact gets a context answer — another answer of its category whose first token
differs — and the conflict prompt::

    Context: The capital of France is Lima.
    The capital of France is

The model then follows its **memory** (next token = the memorised answer's first token), the
**context** (= the context answer's first token), or neither. Facts are split into two halves
(by fact, seeded): heads are scored on one and the effect of pruning them is measured on the other.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...core.errors import HeadatlasError
from ...data.sequences import encode_text
from ...model.info import LoadedModel
from ..common.evaluation import next_token_logits
from ..common.probe_tasks import FACTS, Fact

TEMPLATE = "Context: {context}\n{prompt}"
"""The conflict prompt: the counterfactual statement, a line break, the question prompt again."""
ALTERNATIVES = 2
"""Context answers per known fact (different answers of the fact's category)."""


@dataclass(frozen=True)
class ConflictItem:
    """One conflict prompt: ``ids`` as the model reads them, the memory and context answers and
    the first token of each (what the next-token prediction is compared with)."""

    fact: str
    category: str
    ids: tuple[int, ...]
    memory: str
    context: str
    memory_token: int
    context_token: int


def answer_token(tokenizer: Any, prompt: str, answer: str) -> int:
    """Return the first token of ``answer`` as it follows ``prompt`` after a space."""
    prompt_ids, _ = encode_text(tokenizer, prompt)
    full, _ = encode_text(tokenizer, f"{prompt} {answer}")
    start = 0
    while start < min(len(prompt_ids), len(full) - 1) and prompt_ids[start] == full[start]:
        start += 1
    return int(full[start])


def known_facts(loaded: LoadedModel, facts: Sequence[Fact] = FACTS) -> list[Fact]:
    """Return the facts whose answer's first token the model ranks first given the prompt alone."""
    tok = loaded.tokenizer
    seqs = [tuple(encode_text(tok, f.prompt)[0]) for f in facts]
    top = next_token_logits(loaded, seqs).argmax(-1).tolist()
    return [f for f, t in zip(facts, top, strict=True) if t == answer_token(tok, f.prompt, f.answer)]


def conflict_items(
    loaded: LoadedModel, seed: int = 0, alternatives: int = ALTERNATIVES, facts: Sequence[Fact] = FACTS
) -> list[ConflictItem]:
    """Return the conflict set of ``loaded``: for each known fact, ``alternatives`` prompts whose
    context states another answer of the fact's category (Jin et al. 2024's conflict setting).

    Raises :class:`HeadatlasError` when the model knows fewer than 4 facts.
    """
    tok = loaded.tokenizer
    known = known_facts(loaded, facts)
    if len(known) < 4:
        raise HeadatlasError(
            f"{loaded.info.name} knows {len(known)} of {len(facts)} facts without context: too few to "
            "build a knowledge-conflict set"
        )
    rng = random.Random(seed)
    items = []
    for fact in known:
        memory_token = answer_token(tok, fact.prompt, fact.answer)
        others = sorted({f.answer for f in facts if f.category == fact.category} - {fact.answer})
        rng.shuffle(others)
        chosen = 0
        for other in others:
            context_token = answer_token(tok, fact.prompt, other)
            if context_token == memory_token:
                continue
            text = TEMPLATE.format(context=f"{fact.prompt} {other}.", prompt=fact.prompt)
            ids = tuple(encode_text(tok, text)[0])
            items.append(
                ConflictItem(fact.prompt, fact.category, ids, fact.answer, other, memory_token, context_token)
            )
            chosen += 1
            if chosen == alternatives:
                break
    return items


def split_items(
    items: Sequence[ConflictItem], seed: int = 0
) -> tuple[list[ConflictItem], list[ConflictItem]]:
    """Split ``items`` in two halves by fact (every prompt of a fact on one side), seeded:
    ``(score, test)``."""
    facts = sorted({item.fact for item in items})
    random.Random(seed).shuffle(facts)
    first = set(facts[: len(facts) // 2])
    return [i for i in items if i.fact in first], [i for i in items if i.fact not in first]
