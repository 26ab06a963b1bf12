"""The one reader of JSON-lines files (labelled rows, pair files, probe tasks, guard rows)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import HeadatlasError


def read_jsonl(path: str | Path, hint: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for every non-blank line of the UTF-8 JSON-lines file ``path``.

    Lines are read one at a time, so a caller streaming rows keeps what came before a bad line.
    Raises :class:`HeadatlasError` for a file that cannot be read (``cannot read 'PATH': why``) and
    for a line that is not JSON or not a JSON object (``PATH:LINE: why``, then ``; hint``).
    """
    file = Path(path)
    suffix = f"; {hint}" if hint else ""
    try:
        handle = file.open(encoding="utf-8")
    except OSError as exc:
        raise HeadatlasError(f"cannot read {str(file)!r}: {exc.strerror or exc}") from None
    with handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise HeadatlasError(f"{file}:{number}: not JSON ({exc.msg}){suffix}") from None
                if not isinstance(row, dict):
                    raise HeadatlasError(f"{file}:{number}: not a JSON object{suffix}")
                yield number, row
        except UnicodeDecodeError:
            raise HeadatlasError(f"cannot read {str(file)!r}: it is not UTF-8 text") from None


def count_rows(path: str | Path) -> int:
    """Return how many non-blank lines ``path`` has (the total of a progress bar); 0 if unreadable."""
    try:
        with Path(path).open(encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    except (OSError, UnicodeDecodeError):
        return 0
