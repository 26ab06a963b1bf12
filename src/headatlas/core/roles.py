"""Roles: labels a head earns when a score passes a documented threshold. All thresholds live here.

A head may hold several roles; the atlas keeps every score, so a role is only a convenient name.
Thresholds follow Clark et al. 2019 ("What Does BERT Look At?"), who label heads whose mean
attention to the previous/next token exceeds 0.5 or to [CLS]/[SEP] exceeds 0.6; the others are
our conventions, chosen once and not tuned per model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .scores import LOCAL_WINDOW

PROBE_SELECTIVITY = 0.15
"""Selectivity (probe − control accuracy) a head needs for a ``probe-<task>`` role. The control
task of a head that carries nothing scores within a few points of the task on a test of a few
hundred examples (2σ of a difference of two accuracies near 0.5 at n = 500 is ~0.06; the max over
hundreds of heads adds more), so 15 points.
"""

SHIPS_THRESHOLD = 0.1
"""Ships (KL, nats) a head needs for the ``safety`` role: ablating one head of a model that has
hundreds moves the first response token's distribution by a few hundredths of a nat typically."""


@dataclass(frozen=True)
class Rule:
    """Role ``role`` applies when ``score >= threshold``."""

    role: str
    score: str
    threshold: float
    meaning: str
    below: bool = False
    """When true the role applies when ``score <= threshold`` instead."""

    def holds(self, value: float) -> bool:
        """Return whether a head with this score value earns the role (NaN never does)."""
        if not math.isfinite(value):
            return False
        return bool(value <= self.threshold) if self.below else bool(value >= self.threshold)


RULES: tuple[Rule, ...] = (
    Rule("previous-token", "previous_token", 0.5, "≥ half of the attention on the previous token"),
    Rule("self", "self", 0.5, "≥ half of the attention on the token itself"),
    Rule("sink", "first_token", 0.6, "≥ 60% of the attention on the first token (attention sink)"),
    Rule("local", "local", 0.8, f"≥ 80% of the attention within the last {LOCAL_WINDOW} tokens"),
    Rule("broad", "entropy_norm", 0.75, "entropy ≥ 75% of the uniform distribution's"),
    Rule("subword", "subword", 0.5, "≥ half of a word piece's attention on its word's other pieces"),
    Rule("induction", "induction", 0.3, "≥ 30% on the token after the earlier occurrence ([x; x] battery)"),
    Rule("duplicate", "duplicate_token", 0.3, "≥ 30% on the earlier occurrence of the same token"),
    Rule(
        "retrieval",
        "retrieval",
        0.1,
        "copies ≥ 10% of a recalled needle from the context while decoding (Wu et al. 2024's cut-off)",
    ),
    Rule(
        "successor",
        "successor",
        0.5,
        "its OV output ranks the next item of an ordinal set first in ≥ half the cases",
    ),
    Rule("copying", "copying", 2.0, "raises the logits of the tokens it attends to by ≥ 2 vocabulary std"),
    Rule(
        "copy-suppression",
        "copying",
        -2.0,
        "lowers the logits of the tokens it attends to by ≥ 2 vocabulary std",
        below=True,
    ),
    Rule(
        "translation",
        "translation",
        0.5,
        "attends from the i-th translated word to the i-th source word ≥ half the time",
    ),
    Rule(
        "diagonal",
        "diagonal",
        0.5,
        "cross-attention: ≥ half of a target token's attention near the source's monotonic diagonal",
    ),
    Rule(
        "alignment",
        "alignment",
        0.5,
        "cross-attention: its most-attended source word is a gold link of the target word ≥ half the time",
    ),
    Rule(
        "syntactic",
        "syntactic",
        0.2,
        # The best of ~20 (relation, direction) pairs with ≥ 50 examples beats the baseline by
        # ~0.15 by chance alone (2σ of a difference of two accuracies at n = 50), so 0.2.
        "beats the best fixed-offset baseline by ≥ 20 points of accuracy on some dependency relation",
    ),
    Rule(
        "name-mover",
        "ioi_direct",
        0.1,
        "IOI: its direct path to the logits carries ≥ 10% of the logit difference",
    ),
    Rule(
        "negative-name-mover",
        "ioi_direct",
        -0.1,
        "IOI: its direct path to the logits works against the answer by ≥ 10% of the logit difference",
        below=True,
    ),
    Rule(
        "s-inhibition",
        "ioi_s_inhibition",
        0.05,
        "IOI: ≥ 5% of the logit difference runs through the name movers' queries",
    ),
    Rule(
        "ioi-duplicate",
        "ioi_duplicate",
        0.05,
        "IOI induction / duplicate-token head: ≥ 5% runs through the S-inhibition heads' values",
    ),
    Rule(
        "ioi-previous-token",
        "ioi_previous_token",
        0.05,
        "IOI previous-token head: ≥ 5% runs through the induction / duplicate heads' keys",
    ),
    Rule(
        "memory-head",
        "conflict",
        0.25,
        "knowledge conflict: its direct path pushes the memorised answer over the context's by ≥ 0.25 logits",
    ),
    Rule(
        "context-head",
        "conflict",
        -0.25,
        "knowledge conflict: its direct path pushes the context's answer over the memorised one by ≥ 0.25 logits",
        below=True,
    ),
    Rule(
        "safety",
        "ships",
        SHIPS_THRESHOLD,
        f"ablating it alone moves the first response token on harmful requests by ≥ {SHIPS_THRESHOLD} nats (KL)",
    ),
    Rule(
        "dormant",
        "dormancy",
        0.5,
        "dormant on ≥ half the sequences: ≥ 60% of its attention on the first token, whose value is "
        "near zero, and an output ≤ 0.3 typical value norms (Guo et al. 2024)",
    ),
    Rule(
        "first-token-reader",
        "sink_read",
        0.5,
        "really reads the first token: attention there × its value norm ≥ half a typical value norm",
    ),
    *(
        Rule(
            f"semantic-{relation}",
            f"semantic_{relation}",
            1.0,
            f"attending to the {what}, it raises the {tail}'s logit by ≥ 1 vocabulary std "
            "(attention-weighted; Ren et al. 2024's semantic induction heads)",
        )
        for relation, what, tail in (
            ("dependency", "syntactic head word", "dependent"),
            ("capital", "country", "capital"),
            ("antonym", "word", "opposite"),
        )
    ),
    Rule(
        "negative-bias",
        "negative_attention",
        1.0,
        'yes/no questions: attends to the instruction\'s "No" over its "Yes" with NAS ≥ 1 (Yu et al. 2024)',
    ),
    *(
        Rule(
            f"probe-{task}",
            f"probe_{column}_selectivity",
            PROBE_SELECTIVITY,
            f"a linear probe on its output beats the {task} control task by ≥ "
            f"{PROBE_SELECTIVITY * 100:g} points of test accuracy",
        )
        for column, task in (
            ("upos", "upos"),
            ("deprel", "deprel"),
            ("word_start", "word-start"),
            ("truth", "truth"),
        )
    ),
)
"""Every role. Each rule's score has a :class:`~headatlas.core.scores.ScoreSpec` (tested)."""


def assign_roles(scores: Mapping[str, Any]) -> list[str]:
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
            if rule.holds(float(value)):
                roles[i].append(rule.role)
    return [",".join(r) for r in roles]
