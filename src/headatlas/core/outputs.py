"""Where a command may write: the one output check every command runs before any work, and the
one way a command writes a folder of its own.

Refused before a model is even loaded: a file where a directory is wanted and the reverse, a
location that cannot be written, an atlas file or directory (only the commands that add columns to
an atlas write into one), a model directory (``config.json``) the command did not write, and a
non-empty directory or an existing file that holds nothing the command wrote (unless ``force``).
``force`` never removes what the command does not own: a command writing a folder with ``force``
writes its files beside what is there, replacing only files of the same names.

A folder a command writes whole (a pruned checkpoint, a baked steering checkpoint) carries a
*marker* file only that command writes; a folder with the marker is the command's own and is
replaced as a whole (:func:`output_folder`), atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import HeadatlasError, param
from .storage import ATLAS_FILES, LOCK_FILE, OWNED_FILE, TABLE_FILE, atomic_dir

MODEL_CONFIG = "config.json"
"""The file that makes a directory a Hugging Face model directory."""


@dataclass(frozen=True)
class Folder:
    """A folder a command writes: the command's name (for messages) and its ``marker``, the file
    only that command writes there."""

    command: str
    marker: str


def _nearest_existing(path: Path) -> Path:
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _check_writable(path: Path, name: str) -> None:
    """Raise unless ``path`` (a directory, existing or to be created) can be written."""
    anchor = _nearest_existing(path)
    if not anchor.is_dir():
        raise HeadatlasError(f"{param(name)} {str(path)!r}: {str(anchor)!r} is a file, not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise HeadatlasError(f"{param(name)} {str(path)!r}: {str(anchor)!r} is not writable")


def check_output_dir(path: str | Path, name: str = "out") -> None:
    """Raise :class:`HeadatlasError` (naming parameter ``name``) unless ``path`` is a directory that
    exists and is writable, or can be created. Called before any work."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise HeadatlasError(f"{param(name)} {str(target)!r} is a file: give a directory")
    _check_writable(target, name)


def check_output_file(
    path: str | Path,
    suffixes: Collection[str],
    name: str = "out",
    replaceable: Collection[str] | None = None,
    force: bool = False,
    kind: str | None = None,
) -> None:
    """Raise :class:`HeadatlasError` unless ``path`` may be written as a file, before any work.

    It must end in one of ``suffixes``, must not be a directory, an atlas file
    (:data:`~headatlas.core.storage.ATLAS_FILES`) or a model's ``config.json``, and its directory
    must be writable. An existing file whose suffix is not in ``replaceable`` (default:
    ``suffixes``), or, with ``kind``, a JSON file that does not declare ``"format": kind`` (another
    command's or a user's), is only replaced with ``force``.
    """
    target = Path(path)
    if target.is_dir():
        raise HeadatlasError(f"{param(name)} {str(target)!r} is a directory: give a file name")
    if target.suffix.lower() not in suffixes:
        raise HeadatlasError(f"{param(name)} {str(target)!r}: give a file ending in {', '.join(suffixes)}")
    if target.name in ATLAS_FILES:
        raise HeadatlasError(f"{param(name)} {str(target)!r} is an atlas file: give another file name")
    if target.name == MODEL_CONFIG:
        raise HeadatlasError(f"{param(name)} {str(target)!r} is a model's config: give another file name")
    allowed = suffixes if replaceable is None else replaceable
    foreign = kind is not None and target.is_file() and json_format(target) != kind
    if target.exists() and (target.suffix.lower() not in allowed or foreign) and not force:
        raise HeadatlasError(
            f"{param(name)} {str(target)!r} exists: pass {param('force', 'force=True')} to replace it"
        )
    _check_writable(target.parent, name)


def _entries(folder: Path) -> list[Path]:
    """What a folder holds, leaving out headatlas' own lock and manifest."""
    return [p for p in folder.iterdir() if p.name not in (LOCK_FILE, OWNED_FILE)]


def _is_within(path: Path, model: str | None) -> bool:
    """Whether ``path`` is the directory of the model spec ``model`` (its dir, or a file's dir)."""
    if not model or not Path(model).exists():
        return False
    source = Path(model).resolve()
    return path.resolve() == (source if source.is_dir() else source.parent)


def check_output_folder(
    path: str | Path, folder: Folder, force: bool = False, name: str = "out", model: str | None = None
) -> bool:
    """Raise :class:`HeadatlasError` unless ``folder.command`` may write the folder ``path``, before
    any work. Return ``True`` when the folder is new, empty or the command's own (it holds
    ``folder.marker``), ``False`` when ``force`` lets the command write beside files it did not write.

    Always refused: a file, an unwritable place, an atlas directory, a model directory the command
    did not write (``config.json``), the directory of ``model`` (the spec the model is loaded from).
    """
    target = Path(path)
    check_output_dir(target, name)
    if _is_within(target, model):
        raise HeadatlasError(
            f"{param(name)} {str(target)!r} is where the model's files live: give a new directory"
        )
    if not target.is_dir() or not _entries(target) or (target / folder.marker).is_file():
        return True
    if (target / TABLE_FILE).exists():
        raise HeadatlasError(f"{param(name)} {str(target)!r} holds an atlas: give another directory")
    if (target / MODEL_CONFIG).exists():
        raise HeadatlasError(
            f"{param(name)} {str(target)!r} holds a model ({MODEL_CONFIG}): give another directory"
        )
    if not force:
        raise HeadatlasError(
            f"{param(name)} {str(target)!r} is not empty and holds nothing {folder.command} wrote: give a new "
            f"directory, or pass {param('force', 'force=True')} to write beside what is there (nothing else is removed)"
        )
    return False


@contextlib.contextmanager
def output_folder(path: str | Path, folder: Folder) -> Iterator[Path]:
    """Yield a new empty directory to write ``folder.command``'s output into; on success it becomes
    ``path``. A folder that is new, empty or the command's own (it holds ``folder.marker``) is
    replaced as a whole, atomically (:func:`~headatlas.core.storage.atomic_dir`); any other folder
    (allowed by ``force`` in :func:`check_output_folder`) keeps its files, and only files of the
    same names are replaced. The caller writes ``folder.marker`` into the yielded directory."""
    target = Path(path)
    if not target.is_dir() or not _entries(target) or (target / folder.marker).is_file():
        with atomic_dir(target) as tmp:
            yield tmp
        return
    with atomic_dir(target.with_name(f".{target.name}.new")) as tmp:
        yield tmp
    staged = target.with_name(f".{target.name}.new")
    try:
        for entry in staged.iterdir():
            destination = target / entry.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(entry, destination)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def json_format(path: Path) -> str | None:
    """Return the ``format`` a headatlas JSON file declares, or None (not JSON, no such key)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get("format") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
