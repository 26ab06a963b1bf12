"""The committed benchmark results are strict JSON that any program can read.

Python's ``json`` writes ``NaN`` for a rate with no denominator unless told not to; browsers, ``jq``
and most JSON libraries then refuse the whole file. ``bench/benchlib.strict_json`` writes ``null``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"


def _refuse(constant: str) -> None:
    raise ValueError(f"non-standard JSON constant {constant}")


@pytest.mark.parametrize("path", sorted((BENCH / "results").glob("*.json")), ids=lambda p: p.name)
def test_committed_results_are_strict_json(path: Path) -> None:
    json.loads(path.read_text(), parse_constant=_refuse)


def test_strict_json_writes_null_for_nan_and_infinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from benchlib import strict_json

    text = strict_json({"a": float("nan"), "b": [1.0, float("inf"), (float("-inf"), 2)], "c": "x"})
    assert json.loads(text, parse_constant=_refuse) == {"a": None, "b": [1.0, None, [None, 2]], "c": "x"}
    sys.modules.pop("benchlib", None)
