"""Files on disk: the one atomic-write helper, and the names every writer shares.

Everything headatlas writes goes through :func:`atomic_path`: the content is written to a
temporary file next to the target and renamed over it, so a crash or Ctrl-C never leaves half a
file where a good one was, and a reader never sees a partial write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PARTIAL_DIR = ".partial"
"""Sub-directory of an atlas dir holding the running statistics of an unfinished scan."""

SIDE_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
"""Names allowed for side tables (``DIR/<name>.parquet``): plain identifiers, never a path."""


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it over ``target``.

    ``suffix`` is appended to the temporary name (some writers, e.g. ``np.savez``, insist on an
    extension). On an exception the temporary file is removed and ``target`` is untouched. The
    parent directory is created if needed.
    """
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(target: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | Path, value: Any, indent: int | None = 1) -> Path:
    """Write ``value`` as JSON to ``target`` atomically (non-JSON values via ``str``)."""
    return write_text(target, json.dumps(value, indent=indent, default=str))


PROGRESS_FILE = "progress.json"
"""In ``PARTIAL_DIR``: the finished batches of each attention battery and the scan's fingerprint."""
STATS_FILE = "stats.npz"
"""In ``PARTIAL_DIR``: the running statistics of the attention batteries."""
FUNCTIONAL_PREFIX = "functional-"
"""In ``PARTIAL_DIR``: ``functional-<battery>.{npz,json}`` for each finished functional battery."""


def has_partial(directory: str | Path) -> bool:
    """Return whether ``directory`` holds a partial scan (attention statistics or a finished functional battery)."""
    partial = Path(directory) / PARTIAL_DIR
    return (partial / PROGRESS_FILE).exists() or any(partial.glob(f"{FUNCTIONAL_PREFIX}*.json"))


def discard_partial(directory: str | Path) -> None:
    """Remove ``DIR/.partial`` (only the plain files headatlas writes there)."""
    partial = Path(directory) / PARTIAL_DIR
    if not partial.is_dir():
        return
    for file in partial.iterdir():
        if file.is_file() and file.suffix in (".npz", ".json", ".parquet"):
            file.unlink()
    if not any(partial.iterdir()):
        partial.rmdir()
