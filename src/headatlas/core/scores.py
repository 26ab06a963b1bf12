"""Every score as data: one :class:`ScoreSpec` per atlas score, read by every stage.

Detectors and batteries compute scores; roles, ``show``, the report, figures, the viewer and
``verify`` describe and draw them. What a score *is* (its label, meaning, battery, paper, whether
it is signed, bounded or a vector) lives here once. Importing this module is cheap (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

LOCAL_WINDOW = 4
"""Width w of the ``local`` score: attention on the current token and the w − 1 before it."""
MAX_OFFSET = 64
"""Offsets 0..MAX_OFFSET−1 in the distance profile; also the farthest piece ``subword`` looks at."""


@dataclass(frozen=True)
class ScoreSpec:
    """What one atlas score is.

    Attributes:
        name: the atlas column (``<name>``, ``<name>_std``, ``<name>_n``).
        label: what figures and the report call it.
        short: the column header of ``headatlas show`` (``None``: not shown by default).
        meaning: one line: the definition, in words a user can check.
        battery: the battery (or app) that writes it: ``natural``, ``repeat``, ``needle``, ...
        paper: the paper that defines it.
        signed: values can be negative (drawn on a diverging scale centred on 0).
        bounded: values lie in [0, 1] (unsigned scores that are not are drawn from 0 to their max).
        vector: one vector per head (a list column), not one number.
    """

    name: str
    label: str
    short: str | None
    meaning: str
    battery: str
    paper: str
    signed: bool = False
    bounded: bool = True
    vector: bool = False


_CLARK = "Clark et al. 2019, What Does BERT Look At?"
_GUO = "Guo et al. 2024, Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs"
_HEWITT = "Hewitt & Liang 2019, Designing and Interpreting Probes with Control Tasks"
_JIN = "Jin et al. 2024, Cutting Off the Head Ends the Conflict (knowledge-conflict heads, PH3)"
_MIB = "Mueller et al. 2025, MIB: A Mechanistic Interpretability Benchmark (faithfulness f, CPR, CMD)"
_ZHOU = "Zhou et al. 2024, On the Role of Attention Heads in Large Language Model Safety (Ships)"
_SPECS = (
    ScoreSpec(
        "previous_token", "previous token", "prev", "mean A[i, i−1]: attention on the token just before",
        "natural", _CLARK,
    ),
    ScoreSpec("self", "self", "self", "mean A[i, i]: attention on the token itself", "natural", _CLARK),
    ScoreSpec(
        "first_token", "first token (sink)", "first",
        "mean A[i, first]: attention parked on the first token the model sees",
        "natural", "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks",
    ),
    ScoreSpec(
        "local", "local", "local",
        f"mean Σ A[i, i−{LOCAL_WINDOW - 1}..i]: attention within the last {LOCAL_WINDOW} tokens",
        "natural", _CLARK,
    ),
    ScoreSpec(
        "entropy", "entropy (nats)", None, "mean −Σ A log A over each query row", "natural", _CLARK,
        bounded=False,
    ),
    ScoreSpec(
        "entropy_norm", "entropy / uniform", "ent_n", "entropy divided by log(#keys): 1 = spread evenly",
        "natural", _CLARK,
    ),
    ScoreSpec(
        "subword", "subword", "subw", "a word piece's attention on the other pieces of its word",
        "natural", _CLARK,
    ),
    ScoreSpec(
        "distance_profile", "distance profile", None,
        f"mean attention at relative offset i − j = 0..{MAX_OFFSET - 1}", "natural",
        "Voita et al. 2019, Analyzing Multi-Head Self-Attention", vector=True,
    ),
    ScoreSpec(
        "induction", "induction", "induct", "[x; x]: attention on the token after the earlier copy",
        "repeat", "Olsson et al. 2022, In-context Learning and Induction Heads",
    ),
    ScoreSpec(
        "duplicate_token", "duplicate token", "dup", "[x; x]: attention on the earlier copy of the same token",
        "repeat", "Wang et al. 2022, Interpretability in the Wild",
    ),
    ScoreSpec(
        "retrieval", "retrieval", "retr",
        "needle in a haystack: share of the needle copied while decoding (Wu et al. 2024)", "needle",
        "Wu et al. 2024, Retrieval Head Mechanistically Explains Long-Context Factuality",
    ),
    ScoreSpec(
        "retrieval_tf", "retrieval (teacher-forced)", None,
        "the retrieval score on the gold answer in one forward pass", "needle",
        "Wu et al. 2024, Retrieval Head Mechanistically Explains Long-Context Factuality",
    ),
    ScoreSpec(
        "successor", "successor", "succ", "ordinal sets: OV output ranks the next item first (Gould et al. 2023)",
        "ordinal", "Gould et al. 2023, Successor Heads",
    ),
    ScoreSpec(
        "successor_logit", "successor logit", None, "OV output: z(next item) − z(item itself), vocabulary std",
        "ordinal", "Gould et al. 2023, Successor Heads", signed=True, bounded=False,
    ),
    ScoreSpec(
        "copying", "copying", "copy",
        "z-score of the attended tokens' logits from the head's output (− = suppression)", "copy",
        "Elhage et al. 2021 (copying); McDougall et al. 2023 (copy suppression)", signed=True, bounded=False,
    ),
    ScoreSpec(
        "translation", "translation", "transl",
        "word lists: argmax attention from the i-th target slot to the i-th source word", "translate",
        "Olsson et al. 2022, In-context Learning and Induction Heads (translation); argmax readout of Clark et al. 2019",
    ),
    ScoreSpec(
        "duo_gate", "DuoAttention gate", None,
        "kv fit: the trained gate of the head's KV group (1 = needs its full cache, 0 = streams)",
        "kv fit", "Xiao et al. 2024, DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads",
    ),
    ScoreSpec(
        "diagonal", "monotonic diagonal", "diag",
        "cross-attention mass within ±max(1, 0.1·T_src) source tokens of j/T_src ≈ i/T_tgt",
        "natural", "Bahdanau et al. 2015, Neural Machine Translation by Jointly Learning to Align and Translate",
    ),
    ScoreSpec(
        "alignment", "alignment (argmax)", "align",
        "gold word alignments: the source word a cross-attention head attends to most is a gold link",
        "align", "Garg et al. 2019, Jointly Learning to Align and Translate with Transformer Models",
    ),
    ScoreSpec(
        "alignment_error", "alignment error rate", "aer",
        "AER of the head's argmax word alignment, 1 − (|A∩S| + |A∩P|)/(|A| + |S|); lower is better",
        "align", "Och & Ney 2003, A Systematic Comparison of Various Statistical Alignment Models",
    ),
    ScoreSpec(
        "syntactic", "syntactic", "syntax",
        "best margin over the fixed-offset baseline on a dependency relation (Clark et al. 2019)",
        "syntax", _CLARK, signed=True,
    ),
    ScoreSpec(
        "importance_gradient", "importance (gradient)", "imp",
        "Michel et al.'s E|∂L/∂ξ_h|, each layer L2-normalised, then min–max to [0, 1]", "importance",
        "Michel et al. 2019, Are Sixteen Heads Really Better than One?",
    ),
    ScoreSpec(
        "importance_ablation", "importance (ablation Δloss)", "imp_abl",
        "mean loss increase when the head alone is ablated", "importance",
        "Michel et al. 2019, Are Sixteen Heads Really Better than One?", signed=True, bounded=False,
    ),
    *(
        ScoreSpec(
            name, label, short, f"path patching (IOI): share of the logit difference lost {meaning}", "circuit",
            "Wang et al. 2022, Interpretability in the Wild", signed=True, bounded=False,
        )
        for name, label, short, meaning in (
            ("ioi_direct", "IOI direct effect", "ioi_dir", "through the head's direct path to the logits"),
            ("ioi_s_inhibition", "IOI via name-mover queries", None, "through the name movers' queries"),
            ("ioi_duplicate", "IOI via S-inhibition values", None, "through the S-inhibition heads' values"),
            ("ioi_previous_token", "IOI via induction keys", None, "through the induction / duplicate heads' keys"),
        )
    ),
    *(
        ScoreSpec(
            f"patch_{column}", f"patching ({task})", short,
            (
                "answer probability gained when the head's mean clean output is patched into the "
                "shuffled prompt (causal indirect effect)"
                if task.startswith("fv")
                else "share of the clean − corrupted logit difference the head restores when patched"
            ),
            "patch", paper, signed=True, bounded=False,
        )
        for column, task, short, paper in (
            ("ioi", "ioi", "ioi", "Wang et al. 2022, Interpretability in the Wild"),
            ("fv_antonym", "fv:antonym", None, "Todd et al. 2024, Function Vectors in Large Language Models"),
            ("fv_capitalize", "fv:capitalize", None, "Todd et al. 2024, Function Vectors in Large Language Models"),
            ("fv_country_capital", "fv:country-capital", None, "Todd et al. 2024, Function Vectors in Large Language Models"),
            ("fv_translate", "fv:translate", None, "Todd et al. 2024, Function Vectors in Large Language Models"),
        )
    ),
    *(
        spec
        for column, task, short, what in (
            ("upos", "upos", "p_upos", "universal POS tag of the word (UD EWT, first piece)"),
            ("deprel", "deprel", "p_dep", "dependency relation of the word to its head (UD EWT, subtypes folded)"),
            ("word_start", "word-start", None, "whether the token starts a word (UD EWT)"),
            ("truth", "truth", "p_truth", "whether a short factual statement is true (last token)"),
        )
        for spec in (
            ScoreSpec(
                f"probe_{column}", f"probe accuracy ({task})", short,
                f"test accuracy of a linear probe on the head's output predicting the {what}",
                "probe", _HEWITT,
            ),
            ScoreSpec(
                f"probe_{column}_selectivity", f"probe selectivity ({task})", None,
                f"probe accuracy − control-task accuracy (Hewitt & Liang 2019) on the {task} task",
                "probe", _HEWITT, signed=True,
            ),
        )
    ),
    ScoreSpec(
        "conflict", "knowledge conflict (memory − context)", "confl",
        "direct contribution to logit(memorised answer) − logit(context answer) on conflict prompts (logits)",
        "conflict", _JIN, signed=True, bounded=False,
    ),
    ScoreSpec(
        "ships", "safety head importance (Ships)", "ships",
        "KL(model ‖ head ablated) of the first response token on harmful requests (nats)",
        "safety", _ZHOU, bounded=False,
    ),
    *(
        ScoreSpec(name, label, short, meaning, "dormant", _GUO, bounded=bounded)
        for name, label, short, meaning, bounded in (
            ("dormancy", "dormancy rate", "dorm",
             "share of sequences (prose, code, repeated tokens) where ≥ 60% of its attention is on the "
             "first token and its output norm is ≤ 0.3 typical value norms", True),
            ("sink_value_norm", "value norm at the sink", None,
             "‖v(first token)‖ / mean ‖v(other tokens)‖: ≪ 1 is the value-state drain", False),
            ("sink_output_norm", "output norm", None,
             "mean ‖head output‖ / mean ‖v(other tokens)‖: how much the head writes", False),
            ("sink_read", "first-token read-out", "sink_rd",
             "first_token × sink_value_norm: what the first token contributes to its output", False),
        )
    ),
    *(
        ScoreSpec(
            f"semantic_{relation}", f"semantic induction ({relation})", short,
            f"attention on the {what} × z-score of the {tail}'s logit from the head's output", "semantic",
            "Ren et al. 2024, Identifying Semantic Induction Heads to Understand In-Context Learning",
            signed=True, bounded=False,
        )
        for relation, short, what, tail in (
            ("dependency", "sem_dep", "syntactic head word (UD EWT)", "dependent"),
            ("capital", "sem_cap", "country", "capital"),
            ("antonym", "sem_ant", "word", "opposite"),
        )
    ),
    *(
        spec
        for column, task in (
            ("ioi", "ioi"), ("greater_than", "greater-than"), ("arithmetic", "arithmetic"),
            ("arithmetic_plus", "arithmetic:+"), ("arithmetic_minus", "arithmetic:-"),
            ("arithmetic_times", "arithmetic:*"), ("arithmetic_divide", "arithmetic:/"), ("acronym", "acronym"),
            ("mcqa", "mcqa"), ("icl", "icl"), ("icl_antonym", "icl:antonym"),
            ("icl_country_capital", "icl:country-capital"), ("sequence", "sequence"),
        )
        for spec in (
            ScoreSpec(
                f"circuit_{column}", f"circuit ({task})", None,
                f"1 if the head is in the smallest top-k circuit with faithfulness f ≥ 0.9 on the {task} "
                "task (every other head ablated), else 0", "circuits", _MIB,
            ),
            ScoreSpec(
                f"circuit_{column}_rank", f"circuit rank ({task})", None,
                f"the head's rank (1 = most important) by the circuit's ranking method (EAP-IG, attribution "
                f"or activation patching) on the {task} task", "circuits", _MIB, bounded=False,
            ),
        )
    ),
    ScoreSpec(
        "negative_attention", "negative attention score (NAS)", "nas",
        "yes/no questions: Σ (A[yes] + A[no]) · log(A[no]/A[yes]) over the rows after the instruction",
        "negative", "Yu et al. 2024, Correcting Negative Bias in Large Language Models through Negative "
        "Attention Score Alignment", signed=True, bounded=False,
    ),
)  # fmt: skip

SCORES: dict[str, ScoreSpec] = {spec.name: spec for spec in _SPECS}
"""Every score by name, in display order."""

SCORE_ORDER: tuple[str, ...] = tuple(SCORES)
"""Score names in display order."""

VECTOR_SCORES = frozenset(name for name, spec in SCORES.items() if spec.vector)
"""Scores with a vector per head (stored as list columns), not one number."""


def score_spec(name: str) -> ScoreSpec:
    """Return the spec of ``name``; a column without one (an imported annotation) gets a plain spec."""
    return SCORES.get(name) or ScoreSpec(
        name, name, name[:8], name, "unknown", "", signed=True, bounded=False
    )


def battery_scores(battery: str) -> tuple[str, ...]:
    """Return the scores battery (or app) ``battery`` writes, in display order."""
    return tuple(name for name, spec in SCORES.items() if spec.battery == battery)


def ordered(names: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """Return ``names`` in display order: known scores first (registry order), then the rest sorted."""
    have = set(names)
    return [n for n in SCORE_ORDER if n in have] + sorted(have - set(SCORE_ORDER))
