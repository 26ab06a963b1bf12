"""The guard's rows from files, and streaming scores out: JSONL rows ``{instruction, data[, label]}``
read through the one JSONL reader, and scoring in batches that keeps every result before a bad row
and names that row's line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.errors import HeadatlasError
from ...core.jsonl import count_rows, read_jsonl
from ...core.outputs import Folder
from ...core.progress import Progress, no_progress
from ...core.storage import atomic_path

if TYPE_CHECKING:
    from .core import Guard, GuardResult

EVAL_FOLDER = Folder("guard eval", "eval.json")
"""Where ``guard eval --out`` writes ``eval.json`` and ``scores.jsonl``."""
LINE = "_line"
"""Key under which each row keeps its line number (for errors that name it)."""


def read_rows(path: str | Path, need_label: bool) -> Iterator[dict[str, Any]]:
    """Yield the rows of a guard JSONL file, each with its line number under :data:`LINE`.

    Raises :class:`HeadatlasError` (``PATH:LINE: …``) at the first line that is not a JSON object or
    lacks ``instruction``, ``data`` (and ``label`` with ``need_label``); rows before it were yielded.
    """
    wanted = ("instruction", "data", "label") if need_label else ("instruction", "data")
    for number, row in read_jsonl(path):
        missing = [k for k in wanted if k not in row]
        if missing:
            raise HeadatlasError(f"{path}:{number}: the row has no {missing[0]!r} field")
        yield {**row, LINE: number}


def load_rows(path: str | Path, need_label: bool) -> list[dict[str, Any]]:
    """Return every row of a guard JSONL file (:func:`read_rows`); a bad line is a one-line error."""
    return list(read_rows(path, need_label))


def _score(guard: Guard, batch: list[dict[str, Any]], write: Callable[[GuardResult], None]) -> None:
    for result in guard.results(guard.features(batch, len(batch))):
        write(result)


def _score_or_find_bad_row(
    guard: Guard, path: str | Path, batch: list[dict[str, Any]], write: Callable[[GuardResult], None]
) -> None:
    """Score ``batch``; when it fails, score its rows one by one so every result before the bad row
    is written, then raise naming the bad row's line."""
    try:
        _score(guard, batch, write)
        return
    except HeadatlasError:
        pass
    for row in batch:
        try:
            _score(guard, [row], write)
        except HeadatlasError as exc:
            raise HeadatlasError(f"{path}:{row[LINE]}: {exc.render(lambda name: name)}") from None


def stream_scores(
    guard: Guard,
    path: str | Path,
    write: Callable[[GuardResult], None],
    batch_size: int = 8,
    progress: Progress = no_progress,
) -> int:
    """Score every row of a guard JSONL file in batches and pass each result to ``write`` in order,
    as its batch is scored; return how many rows were scored.

    Stops at the first bad row (a line that is not a row, or data the model cannot take) with a
    one-line :class:`HeadatlasError` naming its line, after writing every result before it.
    """
    total, done = count_rows(path), 0
    batch: list[dict[str, Any]] = []
    rows, bad_line = read_rows(path, need_label=False), None
    while True:
        try:
            batch.append(next(rows))
        except StopIteration:
            break
        except HeadatlasError as exc:  # the rows read before a bad line are still scored
            bad_line = exc
            break
        if len(batch) == batch_size:
            _score_or_find_bad_row(guard, path, batch, write)
            done += len(batch)
            progress(done, total)
            batch = []
    if batch:
        _score_or_find_bad_row(guard, path, batch, write)
        done += len(batch)
        progress(done, total)
    if bad_line is not None:
        raise bad_line
    return done


def write_evaluation(
    out: str | Path, report: dict[str, Any], scores: dict[str, np.ndarray], labels: np.ndarray
) -> list[Path]:
    """Write ``eval.json`` (the report) and ``scores.jsonl`` (each row's label and detector scores)
    into ``out``, each atomically; return the paths."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / EVAL_FOLDER.marker) as tmp:
        tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
    lines = (
        json.dumps({"label": int(labels[k]), **{d: float(s[k]) for d, s in scores.items()}}) + "\n"
        for k in range(len(labels))
    )
    with atomic_path(directory / "scores.jsonl") as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return [directory / "eval.json", directory / "scores.jsonl"]
