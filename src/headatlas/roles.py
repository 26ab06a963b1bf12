"""Roles: labels a head earns when a score passes a documented threshold. All thresholds live here.

A head may hold several roles; the atlas keeps every score, so a role is only a convenient name.
Thresholds follow Clark et al. 2019 ("What Does BERT Look At?"), who label heads whose mean
attention to the previous/next token exceeds 0.5 or to [CLS]/[SEP] exceeds 0.6; the others are
our conventions, chosen once and not tuned per model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rule:
    """Role ``role`` applies when ``score >= threshold``."""

    role: str
    score: str
    threshold: float
    meaning: str


RULES: tuple[Rule, ...] = (
    Rule("previous-token", "previous_token", 0.5, "≥ half of the attention on the previous token"),
    Rule("self", "self", 0.5, "≥ half of the attention on the token itself"),
    Rule("sink", "first_token", 0.6, "≥ 60% of the attention on the first token (attention sink)"),
    Rule("local", "local", 0.8, "≥ 80% of the attention within the last 4 tokens"),
    Rule("broad", "entropy_norm", 0.75, "entropy ≥ 75% of the uniform distribution's"),
    Rule("subword", "subword", 0.5, "≥ half of a word piece's attention on its word's other pieces"),
    Rule("induction", "induction", 0.3, "≥ 30% on the token after the earlier occurrence ([x; x] battery)"),
    Rule("duplicate", "duplicate_token", 0.3, "≥ 30% on the earlier occurrence of the same token"),
)
ROLE_NAMES = tuple(rule.role for rule in RULES)


def assign_roles(scores: dict[str, np.ndarray]) -> list[str]:
    """Return one comma-separated role string per head, given ``{score: values[head_rows]}``.

    Missing scores and NaN values never earn a role.
    """
    n = len(next(iter(scores.values()))) if scores else 0
    roles: list[list[str]] = [[] for _ in range(n)]
    for rule in RULES:
        values = scores.get(rule.score)
        if values is None:
            continue
        for i, value in enumerate(values):
            if np.isfinite(value) and value >= rule.threshold:
                roles[i].append(rule.role)
    return [",".join(r) for r in roles]
