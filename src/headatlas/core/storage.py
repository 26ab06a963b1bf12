"""Files on disk: the one atomic-write helper, the one directory lock, the one check of an output
location, and the names every writer shares.

- Everything headatlas writes goes through :func:`atomic_path` (a file) or :func:`atomic_dir` (a
  directory: a converted model, a pruned or steered checkpoint): the content is written to a
  temporary file or directory next to the target and renamed over it, so a crash or Ctrl-C never
  leaves half a file where a good one was, and a reader never sees a partial write.
- A command that writes into a directory holds :func:`directory_lock` on it, so a second writer
  gets a one-line error instead of racing the first.
- Outputs are checked before any work by :mod:`headatlas.core.outputs`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import HeadatlasError

try:  # POSIX; elsewhere the lock is a no-op
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

PARTIAL_DIR = ".partial"
"""Sub-directory of an atlas dir holding the running statistics of an unfinished scan."""

SIDE_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
"""Names allowed for side tables (``DIR/<name>.parquet``): plain identifiers, never a path."""

TABLE_FILE = "atlas.parquet"
META_FILE = "atlas.json"
EXAMPLES_FILE = "examples.npz"
ATLAS_FILES = frozenset({TABLE_FILE, META_FILE, EXAMPLES_FILE})
"""The files that make an atlas directory an atlas; never overwritten by anything else."""
LOCK_FILE = ".headatlas.lock"
OWNED_FILE = ".headatlas-files.json"
"""In an atlas directory: every other file headatlas wrote there (relative paths), so that an atlas
written over it (``scan --force``) removes exactly those and never a file of the user's."""
OWNER_DEPTH = 3
"""How many directories up from a written file an atlas directory is looked for (``DIR/figures/scores/x.png``)."""


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it over ``target``.

    ``suffix`` is appended to the temporary name (some writers, e.g. ``np.savez``, insist on an
    extension). On an exception the temporary file is removed and ``target`` is untouched. The
    parent directory is created if needed. A file written inside an atlas directory is recorded
    in its :data:`OWNED_FILE` (:func:`owned_files`).
    """
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        if tmp.is_file():  # a writer that made a private temporary file: the mode any new file gets
            os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
        _record_owned(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    """The permissions of a new file under this process's umask (read once)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atlas_root(path: Path) -> Path | None:
    """The nearest atlas directory holding ``path`` (at most :data:`OWNER_DEPTH` levels up), or None."""
    for parent in list(path.absolute().parents)[:OWNER_DEPTH]:
        if (parent / TABLE_FILE).is_file():
            return parent
    return None


def _record_owned(path: Path) -> None:
    """Add ``path`` to its atlas directory's :data:`OWNED_FILE` (the atlas's own files need not be)."""
    root = _atlas_root(path)
    if root is None or path.name == OWNED_FILE:
        return
    relative = path.absolute().relative_to(root).as_posix()
    if relative in ATLAS_FILES or relative.startswith(PARTIAL_DIR + "/"):  # the partial scan is resume's
        return
    known = owned_files(root)
    if relative in known:
        return
    manifest = root / OWNED_FILE
    tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(sorted({*known, relative}), indent=1), encoding="utf-8")
        os.replace(tmp, manifest)
    except OSError:  # a read-only atlas dir: the file is written, only not recorded
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def owned_files(directory: str | Path) -> list[str]:
    """Return the files (paths relative to ``directory``) headatlas wrote into an atlas directory
    besides the atlas itself: figures, the report, verify and redundancy files, side outputs."""
    manifest = Path(directory) / OWNED_FILE
    try:
        names = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(n) for n in names if isinstance(n, str)] if isinstance(names, list) else []


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a new empty directory next to ``target``; on success it takes ``target``'s place.

    Whatever is written there appears at ``target`` all at once: a crash or Ctrl-C while writing
    leaves the old ``target`` (or none) and never old and new files mixed. An existing ``target``
    is first renamed aside and removed once the new one is in place; on an exception the new
    directory is removed and ``target`` is untouched. Callers check that ``target`` may be replaced
    (e.g. that it is not an atlas or a model's own directory) before any work.
    """
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


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


@contextlib.contextmanager
def directory_lock(directory: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (created if needed) while writing into it.

    A second headatlas process (or a second lock in this one) gets :class:`HeadatlasError` at
    once, naming the process that holds it. The lock is released on exit, also on error; the OS
    releases it if the process dies. A run that wrote nothing (it failed before its first file)
    leaves neither the lock file nor the directories the lock created.
    """
    path = Path(directory)
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    held = False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip()
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise HeadatlasError(
                    f"another headatlas process{who} is writing to {str(path)!r}: wait for it to finish "
                    "or use another directory"
                ) from None
        held = True
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        if held:
            _leave_nothing_empty(path, created)
        handle.close()  # closing releases the lock


def _leave_nothing_empty(path: Path, created: list[Path]) -> None:
    """After a writer that found nothing to write (a run that failed early): remove the lock and the
    directories the lock itself created, so no empty directory with a lock in it is left."""
    if any(p.name != LOCK_FILE for p in path.iterdir()):
        return
    with contextlib.suppress(OSError):
        (path / LOCK_FILE).unlink()
        for folder in created:  # innermost first
            folder.rmdir()


def cache_dir() -> Path:
    """Return the headatlas cache directory: ``$HEADATLAS_CACHE`` or ``~/.cache/headatlas``.

    The directory is not created here; writers create what they need.
    """
    env = os.environ.get("HEADATLAS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "headatlas"


def check_cache_dir() -> Path:
    """Return :func:`cache_dir` after checking it is (or can become) a writable directory."""
    root = cache_dir()
    current = root.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    if not current.is_dir():
        raise HeadatlasError(
            f"the headatlas cache {str(root)!r} ($HEADATLAS_CACHE) is under a file: point it at a directory"
        )
    if not os.access(current, os.W_OK | os.X_OK):
        raise HeadatlasError(
            f"the headatlas cache {str(root)!r} ($HEADATLAS_CACHE) is not writable: point it elsewhere"
        )
    return root
