"""Conformance: every transformers family built tiny and checked (:mod:`.sweep`), the checks
themselves (:mod:`.checks`, also behind ``headatlas doctor``), the families and the shrinker
(:mod:`.families`), and the supported-models page (:mod:`.page`)."""

from .checks import CHECKS, Outcome, delta_check, first_prompt, run_check
from .families import Family, build_tiny, families, load_tiny, tiny_tokenizer
from .page import render, rows_json
from .sweep import CATEGORIES, Row, by_name, category, check_all, run_family, sweep

__all__ = [
    "CATEGORIES",
    "CHECKS",
    "Family",
    "Outcome",
    "Row",
    "build_tiny",
    "by_name",
    "category",
    "check_all",
    "delta_check",
    "families",
    "first_prompt",
    "load_tiny",
    "render",
    "rows_json",
    "run_check",
    "run_family",
    "sweep",
    "tiny_tokenizer",
]
